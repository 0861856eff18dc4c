"""proto <-> executor domain. Sensitive values are masked here, on the way
out, except in the one explicit sensitive read."""
from __future__ import annotations

from google.protobuf import duration_pb2

from infrakitchen.events.v1 import events_pb2
from infrakitchen.executor.v1 import executor_pb2 as pb
from services.common.values import from_struct, to_struct, to_timestamp, to_value
from services.executor.domain.model import (AWS, AZURE, ENV, GCP, GENERIC, LOCAL, OIDC, PG, TF_VAR, Correlation,
                                            Integration, Job, Output, PlanSummary, Secret, Source, Storage)

ACTION = {pb.JOB_ACTION_PLAN: "plan", pb.JOB_ACTION_APPLY: "apply", pb.JOB_ACTION_DESTROY: "destroy"}
ACTION_PB = {v: k for k, v in ACTION.items()}
STATUS = {pb.JOB_STATUS_QUEUED: "queued", pb.JOB_STATUS_RUNNING: "running", pb.JOB_STATUS_SUCCEEDED: "succeeded",
          pb.JOB_STATUS_FAILED: "failed", pb.JOB_STATUS_CANCELLED: "cancelled", pb.JOB_STATUS_TIMED_OUT: "timed_out"}
STATUS_PB = {v: k for k, v in STATUS.items()}
PROVIDER = {pb.INTEGRATION_PROVIDER_AWS: AWS, pb.INTEGRATION_PROVIDER_AZURE: AZURE,
            pb.INTEGRATION_PROVIDER_GCP: GCP, pb.INTEGRATION_PROVIDER_GENERIC: GENERIC,
            pb.INTEGRATION_PROVIDER_OIDC: OIDC}
OIDC_FIELDS = ("cloud", "audience", "role_arn", "service_account_email", "azure_client_id", "azure_tenant_id",
               "azure_subscription_id", "token_file_env")
PROVIDER_PB = {v: k for k, v in PROVIDER.items()}
EXPOSURE = {pb.SECRET_EXPOSURE_TF_VAR: TF_VAR, pb.SECRET_EXPOSURE_ENV: ENV}
EXPOSURE_PB = {v: k for k, v in EXPOSURE.items()}
KIND = {pb.STORAGE_KIND_LOCAL: LOCAL, pb.STORAGE_KIND_PG: PG}
KIND_PB = {v: k for k, v in KIND.items()}


def job_from_submit(r: pb.SubmitJobRequest) -> Job:
    c = r.correlation
    return Job(
        id="", action=ACTION.get(r.action, ""),
        source=Source(r.source.repository_url, r.source.ref, r.source.path.rstrip("/")),
        variables=from_struct(r.variables), sensitive_variables=list(dict.fromkeys(r.sensitive_variables)),
        integration_ids=list(r.integration_ids), secret_ids=list(r.secret_ids), storage_id=r.storage_id,
        state_path=r.state_path,
        correlation=Correlation(c.resource_id, c.resource_revision, c.workflow_id, c.step_id, c.temporary_state_id,
                                c.template_id),
        plan_job_id=r.plan_job_id, timeout_seconds=r.timeout.ToTimedelta().total_seconds(),
    )


def _correlation_pb(c: Correlation) -> pb.JobCorrelation:
    return pb.JobCorrelation(resource_id=c.resource_id, resource_revision=c.resource_revision,
                             workflow_id=c.workflow_id, step_id=c.step_id, temporary_state_id=c.temporary_state_id,
                             template_id=c.template_id)


def outputs_pb(outputs: list[Output], reveal: bool = False) -> list[pb.JobOutput]:
    return [pb.JobOutput(name=o.name, value=to_value(o.value if reveal else o.masked().value), sensitive=o.sensitive)
            for o in outputs]


def plan_summary_pb(p: PlanSummary | None) -> pb.PlanSummary | None:
    if p is None:
        return None
    return pb.PlanSummary(add=p.add, change=p.change, destroy=p.destroy, resource_changes=[
        pb.ResourceChange(address=a, actions=list(actions)) for a, actions in p.resource_changes],
        state_serial=p.state_serial, state_lineage=p.state_lineage)


def job_to_pb(j: Job) -> pb.Job:
    timeout = duration_pb2.Duration()
    timeout.FromNanoseconds(int(j.timeout_seconds * 1e9))
    return pb.Job(
        id=j.id, action=ACTION_PB[j.action], status=STATUS_PB[j.status],
        source=pb.JobSource(repository_url=j.source.repository_url, ref=j.source.ref, path=j.source.path),
        variables=to_struct(j.masked_variables()), sensitive_variables=j.sensitive_variables,
        integration_ids=j.integration_ids, secret_ids=j.secret_ids, storage_id=j.storage_id,
        state_path=j.state_path, correlation=_correlation_pb(j.correlation), plan_job_id=j.plan_job_id,
        timeout=timeout, outputs=outputs_pb(j.outputs), plan_summary=plan_summary_pb(j.plan_summary),
        exit_code=j.exit_code, error_message=j.error_message, attempt=j.attempt, worker=j.worker,
        creator=j.creator, create_time=to_timestamp(j.create_time), start_time=to_timestamp(j.start_time),
        end_time=to_timestamp(j.end_time), queue_reason=j.queue_reason,
    )


def job_changed(j: Job) -> events_pb2.JobChanged:
    return events_pb2.JobChanged(
        job_id=j.id, action=ACTION_PB[j.action], status=STATUS_PB[j.status],
        correlation=_correlation_pb(j.correlation), outputs=outputs_pb(j.outputs),
        plan_summary=plan_summary_pb(j.plan_summary), exit_code=j.exit_code, error_message=j.error_message,
        attempt=j.attempt, start_time=to_timestamp(j.start_time), end_time=to_timestamp(j.end_time),
    )


def integration_from_pb(i: pb.Integration, credentials) -> Integration:
    return Integration(id=i.id, name=i.name.strip(), description=i.description,
                       provider=PROVIDER.get(i.provider, ""), credentials=dict(credentials),
                       max_concurrent_jobs=i.max_concurrent_jobs,
                       oidc={f: getattr(i.oidc, f) for f in OIDC_FIELDS if getattr(i.oidc, f)}
                       if i.HasField("oidc") else {})


def integration_to_pb(i: Integration) -> pb.Integration:
    return pb.Integration(id=i.id, name=i.name, description=i.description, provider=PROVIDER_PB[i.provider],
                          credential_keys=sorted(i.credentials), creator=i.creator,
                          create_time=to_timestamp(i.create_time), update_time=to_timestamp(i.update_time),
                          etag=i.etag, max_concurrent_jobs=i.max_concurrent_jobs,
                          oidc=pb.OidcFederation(**i.oidc) if i.oidc else None)


def secret_from_pb(x: pb.Secret, values) -> Secret:
    return Secret(id=x.id, name=x.name.strip(), description=x.description, exposure=EXPOSURE.get(x.exposure, ""),
                  values=dict(values))


def secret_to_pb(x: Secret) -> pb.Secret:
    return pb.Secret(id=x.id, name=x.name, description=x.description, exposure=EXPOSURE_PB[x.exposure],
                     keys=sorted(x.values), creator=x.creator, create_time=to_timestamp(x.create_time),
                     update_time=to_timestamp(x.update_time), etag=x.etag)


def storage_from_pb(x: pb.Storage) -> Storage:
    return Storage(id=x.id, name=x.name.strip(), kind=KIND.get(x.kind, ""), local_directory=x.local_directory,
                   pg_connection_string=x.pg_connection_string, pg_schema=x.pg_schema)


def storage_to_pb(x: Storage) -> pb.Storage:
    # pg_connection_string is INPUT_ONLY: it holds a password.
    return pb.Storage(id=x.id, name=x.name, kind=KIND_PB[x.kind], local_directory=x.local_directory,
                      pg_schema=x.pg_schema, creator=x.creator, create_time=to_timestamp(x.create_time), etag=x.etag)
