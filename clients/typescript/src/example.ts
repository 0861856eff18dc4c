// The README example from TypeScript, end to end, with what `ik example register`
// made (the Production Environment blueprint, the "example" integration and
// the "example-local" storage): preview, create, execute, watch to the end,
// stream one job's logs, and decode a field violation. IK_TOKEN and the
// service targets come from the environment (see targetsFromEnv).
//   npm run build && IK_TOKEN=$(make -s token | tail -1) npm run example
import { Code, ConnectError, connect, describeError } from "./index.js";
import { JobStatus } from "./gen/infrakitchen/executor/v1/executor_pb.js";
import { StepStatus, WorkflowStatus, type Workflow } from "./gen/infrakitchen/workflow/v1/workflow_pb.js";

async function main(): Promise<number> {
  const token = process.env.IK_TOKEN;
  if (!token) {
    console.error("set IK_TOKEN (make token prints one)");
    return 2;
  }
  const ik = connect({ token });

  const { blueprints } = await ik.blueprint.listBlueprints({ pageSize: 100 });
  const blueprint = blueprints.find((b) => b.name === "Production Environment");
  if (!blueprint) {
    console.error("no Production Environment blueprint: run `ik example register` first");
    return 1;
  }
  const preview = await ik.blueprint.previewBlueprint({ id: blueprint.id });
  for (const step of preview.steps) {
    console.log(`step ${step.position} ${step.templateName}: ${step.variables.map((v) => v.name).join(", ")}`);
  }
  const vpc = preview.steps.find((s) => s.templateName === "VPC")!;
  const integrations = (await ik.executor.listIntegrations({ pageSize: 100 })).integrations
    .filter((i) => i.name === "example").map((i) => i.id);
  const storage = (await ik.executor.listStorages({ pageSize: 100 })).storages.find((s) => s.name === "example-local");

  // A google.protobuf.Struct is a plain JSON object: snake_case keys stay as written.
  let w: Workflow = await ik.workflow.createWorkflow({
    blueprintId: blueprint.id,
    variableOverrides: [{ templateId: vpc.templateId, variables: { cidr_block: "10.9.0.0/16" } }],
    integrationIds: integrations,
    storageId: storage?.id ?? "",
  });
  w = await ik.workflow.executeWorkflow({ id: w.id });
  console.log(`workflow ${w.id} started`);
  for await (const change of ik.workflow.watchWorkflow({ id: w.id })) {
    w = change.workflow!;
    // Enums are numbers in TypeScript: their names come from the enum object.
    console.log(`  ${WorkflowStatus[w.status]}: ${w.steps.map((s) => `${s.templateName}=${StepStatus[s.status]}`).join(" ")}`);
    if (w.status === WorkflowStatus.DONE || w.status === WorkflowStatus.ERROR) break;
  }

  // One job's logs, streamed to its end (line numbers are bigint: int64).
  const vpcStep = w.steps.find((s) => s.templateName === "VPC")!;
  let lines = 0n;
  let applyComplete = false;
  let finalStatus = JobStatus.UNSPECIFIED;
  for await (const chunk of ik.executor.streamJobLogs({ jobId: vpcStep.jobId })) {
    for (const line of chunk.lines) {
      lines = line.number;
      applyComplete ||= line.text.includes("Apply complete!");
    }
    if (chunk.finalStatus) {
      finalStatus = chunk.finalStatus;
      break;
    }
  }

  // A mistake: the service answers INVALID_ARGUMENT with the fields it refused.
  let violation = null;
  try {
    await ik.workflow.createWorkflow({ blueprintId: "" });
  } catch (err) {
    if (err instanceof ConnectError && err.code === Code.InvalidArgument) violation = describeError(err);
    else throw err;
  }

  const summary = {
    workflowId: w.id,
    status: WorkflowStatus[w.status],
    steps: Object.fromEntries(w.steps.map((s) => [s.templateName, s.resourceId])),
    subnetIds: w.steps.find((s) => s.templateName === "EKS Cluster")?.resolvedVariables?.subnet_ids,
    vpcJob: { id: vpcStep.jobId, lines: Number(lines), applyComplete, finalStatus: JobStatus[finalStatus] },
    violation,
  };
  console.log(JSON.stringify(summary, null, 2));
  return w.status === WorkflowStatus.DONE && applyComplete && violation !== null ? 0 : 1;
}

main().then((code) => process.exit(code), (err) => {
  console.error(describeError(err));
  process.exit(1);
});
