/**
 * The one DynamoDB document client of a process, shared by every store module. Store modules
 * (this folder) are the only files that import `@aws-sdk/*` for DynamoDB.
 */
import { DynamoDBClient } from '@aws-sdk/client-dynamodb';
import { DynamoDBDocumentClient } from '@aws-sdk/lib-dynamodb';
import type { Config } from '../config.ts';

export interface DynamoOptions {
  endpoint?: string;
  region: string;
}

export function createDocumentClient(options: DynamoOptions): DynamoDBDocumentClient {
  const client = new DynamoDBClient({
    region: options.region,
    endpoint: options.endpoint,
    // DynamoDB Local accepts any credentials; on AWS the function's role provides them.
    ...(options.endpoint && !process.env.AWS_ACCESS_KEY_ID
      ? { credentials: { accessKeyId: 'local', secretAccessKey: 'local' } }
      : {}),
    maxAttempts: 4,
  });
  return DynamoDBDocumentClient.from(client, {
    marshallOptions: { removeUndefinedValues: true },
  });
}

export function documentClientFor(config: Config): DynamoDBDocumentClient {
  return createDocumentClient({ endpoint: config.dynamodbEndpoint, region: config.region });
}
