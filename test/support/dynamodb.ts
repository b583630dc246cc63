/**
 * DynamoDB Local for integration tests: the database shared by the test run (started by
 * test/support/global-setup.ts) and fresh, uniquely named tables per test file or test, so suites
 * running in parallel never see each other's items.
 */
import { randomBytes } from 'node:crypto';
import { DynamoDBClient } from '@aws-sdk/client-dynamodb';
import { inject } from 'vitest';
import { createPrefixedTables } from '../../infra/local/create-tables.ts';
import { type Config, loadConfig } from '../../shared/config.ts';
import type {} from './global-setup.ts';

export const TEST_REGION = 'us-east-1';

/** The endpoint of the run's DynamoDB Local (DYNAMODB_ENDPOINT when set). */
export function useDynamoDbLocal(): string {
  const endpoint = process.env.DYNAMODB_ENDPOINT || inject('dynamodbEndpoint');
  if (!endpoint) {
    throw new Error(
      "no DynamoDB Local: register 'test/support/global-setup.ts' as globalSetup in vitest.config.ts or set DYNAMODB_ENDPOINT",
    );
  }
  return endpoint;
}

/** A low-level client on the run's DynamoDB Local, with the dummy credentials it accepts. */
export function testDynamoDbClient(): DynamoDBClient {
  return new DynamoDBClient({
    endpoint: useDynamoDbLocal(),
    region: TEST_REGION,
    credentials: { accessKeyId: 'local', secretAccessKey: 'local' },
  });
}

/** Creates every table of shared/tables.ts as `<prefix>-users`, …; the prefix defaults to a random `t…`. */
export async function createTestTables(
  prefix = `t${randomBytes(6).toString('hex')}`,
): Promise<Config['tables']> {
  return createPrefixedTables(useDynamoDbLocal(), TEST_REGION, prefix);
}

/**
 * A configuration on fresh test tables of the run's DynamoDB Local; `env` as for `loadConfig`.
 * `SM_POST_ORDER` in the environment applies to every test that does not set it itself
 * (`SM_POST_ORDER=checked npx vitest run test/e2e` runs the suite with the other posting order).
 */
export async function createTestConfig(env: Record<string, string | undefined> = {}): Promise<Config> {
  const tables = await createTestTables();
  const order = process.env.SM_POST_ORDER ? { SM_POST_ORDER: process.env.SM_POST_ORDER } : {};
  return {
    ...loadConfig({ AWS_REGION: TEST_REGION, ...order, ...env }),
    tables,
    dynamodbEndpoint: useDynamoDbLocal(),
  };
}
