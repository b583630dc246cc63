/**
 * One local Nimbus stack per test file: fresh tables on the run's DynamoDB Local, the
 * gateway emulator on a free port, the real handlers behind it.
 */

import { type LocalStack, type LocalStackOptions, startLocalStack } from '../../infra/local/stack.ts';
import { createLogger } from '../../shared/log.ts';
import { deriveScramCredentials } from '../../shared/sasl/scram.ts';
import { createTestConfig } from './dynamodb.ts';

export interface TestStack extends LocalStack {
  addUser(jid: string, password: string): Promise<void>;
}

export async function startTestStack(
  env: Record<string, string | undefined> = {},
  options: Pick<LocalStackOptions, 'log' | 'metricLines' | 'faults' | 'eventSource'> = {},
): Promise<TestStack> {
  const config = await createTestConfig({ SCRAM_ITERATIONS: '4096', ...env });
  const stack = await startLocalStack({
    config,
    port: 0,
    log: options.log ?? createLogger(process.env.LOG_LEVEL ?? 'warn'),
    ...(options.metricLines ? { metricLines: options.metricLines } : {}),
    ...(options.faults ? { faults: options.faults } : {}),
    ...(options.eventSource ? { eventSource: options.eventSource } : {}),
  });
  return {
    ...stack,
    async addUser(jid, password) {
      const iterations = config.scramIterations;
      await stack.server.users.create(jid, {
        sha1: await deriveScramCredentials(password, 'sha1', iterations),
        sha256: await deriveScramCredentials(password, 'sha256', iterations),
      });
    },
  };
}
