/**
 * Vitest global setup: one DynamoDB Local for the whole test run, on a free port, in memory.
 * Test files reach it through `useDynamoDbLocal()` (test/support/dynamodb.ts), which reads the
 * endpoint provided here. With DYNAMODB_ENDPOINT set, that database is used and none is started.
 */
import type { TestProject } from 'vitest/node';
import { findFreePort, startDynamoDbLocal } from '../../infra/local/dynamodb-local.ts';

declare module 'vitest' {
  export interface ProvidedContext {
    /** `http://127.0.0.1:<port>` of the DynamoDB Local shared by the test run. */
    dynamodbEndpoint: string;
  }
}

export default async function setup(project: TestProject): Promise<() => Promise<void>> {
  const external = process.env.DYNAMODB_ENDPOINT;
  if (external) {
    project.provide('dynamodbEndpoint', external);
    return async () => {};
  }
  const database = await startDynamoDbLocal({ port: await findFreePort() });
  project.provide('dynamodbEndpoint', database.endpoint);
  return () => database.stop();
}
