// InfraKitchen's TypeScript client: the five services' generated clients
// (protobuf-es messages, Connect speaking gRPC over HTTP/2), a bearer-token
// interceptor, where the services are (the same settings as the `ik` CLI),
// and the rich error details decoded (BadRequest, PreconditionFailure,
// ErrorInfo). Messages are plain objects: int64 is bigint, a
// google.protobuf.Struct is a JSON object (snake_case keys kept as given),
// timestamps are google.protobuf.Timestamp (timestampDate() converts).
import { Code, ConnectError, createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import {
  BadRequestSchema,
  ErrorInfoSchema,
  PreconditionFailureSchema,
} from "./gen/google/rpc/error_details_pb.js";
import { ApprovalService } from "./gen/infrakitchen/approval/v1/approval_pb.js";
import { BlueprintService } from "./gen/infrakitchen/blueprint/v1/blueprint_pb.js";
import { ExecutorService } from "./gen/infrakitchen/executor/v1/executor_pb.js";
import { ResourceService } from "./gen/infrakitchen/resource/v1/resource_pb.js";
import { WorkflowService } from "./gen/infrakitchen/workflow/v1/workflow_pb.js";

export * as approval from "./gen/infrakitchen/approval/v1/approval_pb.js";
export * as blueprint from "./gen/infrakitchen/blueprint/v1/blueprint_pb.js";
export * as executor from "./gen/infrakitchen/executor/v1/executor_pb.js";
export * as resource from "./gen/infrakitchen/resource/v1/resource_pb.js";
export * as workflow from "./gen/infrakitchen/workflow/v1/workflow_pb.js";
export { Code, ConnectError };

export const SERVICES = ["blueprint", "workflow", "resource", "executor", "approval"] as const;
export type ServiceName = (typeof SERVICES)[number];
export const DEFAULT_PORTS: Record<ServiceName, number> = {
  blueprint: 50051, workflow: 50052, resource: 50053, executor: 50054, approval: 50055,
};

/** host:port of each service: IK_<SVC>_TARGET, else IK_SERVER (default 127.0.0.1)
 * with IK_<SVC>_PORT or the service's default port, as the CLI reads them. */
export function targetsFromEnv(env: Record<string, string | undefined> = process.env): Record<ServiceName, string> {
  const server = env.IK_SERVER || "127.0.0.1";
  const out = {} as Record<ServiceName, string>;
  for (const name of SERVICES) {
    const upper = name.toUpperCase();
    out[name] = env[`IK_${upper}_TARGET`] || `${server}:${env[`IK_${upper}_PORT`] || DEFAULT_PORTS[name]}`;
  }
  return out;
}

/** Adds `authorization: Bearer <token>` to every call. */
export function bearer(token: string): Interceptor {
  return (next) => async (req) => {
    req.header.set("authorization", `Bearer ${token}`);
    return next(req);
  };
}

export interface InfraKitchen {
  blueprint: Client<typeof BlueprintService>;
  workflow: Client<typeof WorkflowService>;
  resource: Client<typeof ResourceService>;
  executor: Client<typeof ExecutorService>;
  approval: Client<typeof ApprovalService>;
}

/** Clients of the five services, each over its own gRPC (HTTP/2, plaintext) transport. */
export function connect(options: { token: string; targets?: Partial<Record<ServiceName, string>> }): InfraKitchen {
  const targets = { ...targetsFromEnv(), ...(options.targets ?? {}) };
  const transport = (name: ServiceName) =>
    createGrpcTransport({ baseUrl: `http://${targets[name]}`, interceptors: [bearer(options.token)] });
  return {
    blueprint: createClient(BlueprintService, transport("blueprint")),
    workflow: createClient(WorkflowService, transport("workflow")),
    resource: createClient(ResourceService, transport("resource")),
    executor: createClient(ExecutorService, transport("executor")),
    approval: createClient(ApprovalService, transport("approval")),
  };
}

/** What a failed call said, with the details the services attach. */
export interface Problem {
  code: string;
  message: string;
  reason?: string;
  metadata?: Record<string, string>;
  fieldViolations: { field: string; description: string }[];
  preconditionViolations: { type: string; subject: string; description: string }[];
}

export function describeError(error: unknown): Problem {
  const err = ConnectError.from(error);
  const info = err.findDetails(ErrorInfoSchema)[0];
  return {
    code: Code[err.code],
    message: err.rawMessage,
    reason: info?.reason,
    metadata: info?.metadata,
    fieldViolations: err.findDetails(BadRequestSchema).flatMap((d) =>
      d.fieldViolations.map((v) => ({ field: v.field, description: v.description }))),
    preconditionViolations: err.findDetails(PreconditionFailureSchema).flatMap((d) =>
      d.violations.map((v) => ({ type: v.type, subject: v.subject, description: v.description }))),
  };
}
