"""proto <-> resource domain. Sensitive variables and outputs leave masked."""
from __future__ import annotations

import datetime as dt

from infrakitchen.resource.v1 import resource_pb2 as pb
from services.common.values import from_struct, from_value, to_struct, to_timestamp, to_value
from services.resource.domain.model import (AuditEntry, DependencyConfig, DependencyTag, Resource, Revision,
                                            TemporaryState)

STATE = {pb.RESOURCE_STATE_PROVISION: "provision", pb.RESOURCE_STATE_PROVISIONED: "provisioned",
         pb.RESOURCE_STATE_DESTROY: "destroy", pb.RESOURCE_STATE_DESTROYED: "destroyed"}
STATE_PB = {v: k for k, v in STATE.items()}
STATUS = {pb.RESOURCE_STATUS_READY: "ready", pb.RESOURCE_STATUS_QUEUED: "queued",
          pb.RESOURCE_STATUS_IN_PROGRESS: "in_progress", pb.RESOURCE_STATUS_DONE: "done",
          pb.RESOURCE_STATUS_ERROR: "error", pb.RESOURCE_STATUS_APPROVAL_PENDING: "approval_pending",
          pb.RESOURCE_STATUS_PENDING: "pending", pb.RESOURCE_STATUS_REJECTED: "rejected",
          pb.RESOURCE_STATUS_UNKNOWN: "unknown"}
STATUS_PB = {v: k for k, v in STATUS.items()}
TS_STATUS_PB = {"pending": pb.TEMPORARY_STATE_STATUS_PENDING,
                "approval_pending": pb.TEMPORARY_STATE_STATUS_APPROVAL_PENDING,
                "merged": pb.TEMPORARY_STATE_STATUS_MERGED, "rejected": pb.TEMPORARY_STATE_STATUS_REJECTED}


def resource_from_pb(r: pb.Resource) -> Resource:
    return Resource(
        id=r.id, name=r.name.strip(), template_id=r.template_id, source_code_version_id=r.source_code_version_id,
        description=r.description, variables=from_struct(r.variables), parent_ids=list(r.parent_ids),
        dependency_tags=[DependencyTag(t.name, t.value, t.inherited_by_children) for t in r.dependency_tags],
        dependency_configs=[DependencyConfig(c.name, from_value(c.value), c.inherited_by_children)
                            for c in r.dependency_configs],
        integration_ids=list(r.integration_ids), secret_ids=list(r.secret_ids), storage_id=r.storage_id,
        storage_path=r.storage_path.strip("/"), workspace=r.workspace, labels=list(r.labels))


DRY_RUN_STATUS_PB = {"queued": pb.DRY_RUN_STATUS_QUEUED, "running": pb.DRY_RUN_STATUS_RUNNING,
                     "succeeded": pb.DRY_RUN_STATUS_SUCCEEDED, "failed": pb.DRY_RUN_STATUS_FAILED,
                     "cancelled": pb.DRY_RUN_STATUS_CANCELLED, "timed_out": pb.DRY_RUN_STATUS_TIMED_OUT}


def dry_run_to_pb(d: dict) -> "pb.DryRun | None":
    if not d:
        return None
    moment = lambda text: to_timestamp(dt.datetime.fromisoformat(text)) if text else None  # noqa: E731
    return pb.DryRun(job_id=d["job_id"], status=DRY_RUN_STATUS_PB.get(d["status"], pb.DRY_RUN_STATUS_UNSPECIFIED),
                     plan_add=d["plan_add"], plan_change=d["plan_change"], plan_destroy=d["plan_destroy"],
                     error_message=d["error_message"], start_time=moment(d["start_time"]),
                     completion_time=moment(d["completion_time"]))


def resource_to_pb(r: Resource) -> pb.Resource:
    return pb.Resource(
        id=r.id, name=r.name, description=r.description, template_id=r.template_id,
        source_code_version_id=r.source_code_version_id, state=STATE_PB[r.state], status=STATUS_PB[r.status],
        abstract=r.abstract, variables=to_struct(r.masked_variables()),
        outputs=[pb.ResourceOutput(name=o.name, value=to_value(o.value), sensitive=o.sensitive)
                 for o in r.masked_outputs()],
        parent_ids=r.parent_ids,
        dependency_tags=[pb.DependencyTag(name=t.name, value=t.value, inherited_by_children=t.inherited_by_children)
                         for t in r.dependency_tags],
        dependency_configs=[pb.DependencyConfig(name=c.name, value=to_value(c.value),
                                                inherited_by_children=c.inherited_by_children)
                            for c in r.dependency_configs],
        integration_ids=r.integration_ids, secret_ids=r.secret_ids, storage_id=r.storage_id,
        storage_path=r.storage_path, workspace=r.workspace, labels=r.labels, revision=r.revision, owners=r.owners,
        creator=r.creator, error_message=r.error_message, last_job_id=r.last_job_id,
        approval_request_id=r.approval_request_id, workflow_id=r.workflow_id, step_id=r.step_id,
        create_time=to_timestamp(r.create_time), update_time=to_timestamp(r.update_time), etag=r.etag,
        last_dry_run=dry_run_to_pb(r.last_dry_run))


def temporary_state_from_pb(t: pb.TemporaryState) -> TemporaryState:
    return TemporaryState(
        id=t.id, resource_id=t.resource_id,
        description=t.description if t.HasField("description") else None,
        source_code_version_id=t.source_code_version_id if t.HasField("source_code_version_id") else None,
        variables=from_struct(t.variables), integration_ids=list(t.integration_ids) or None,
        secret_ids=list(t.secret_ids) or None, labels=list(t.labels) or None,
        workspace=t.workspace if t.HasField("workspace") else None)


def temporary_state_to_pb(t: TemporaryState, sensitive: list[str]) -> pb.TemporaryState:
    out = pb.TemporaryState(
        id=t.id, resource_id=t.resource_id, status=TS_STATUS_PB[t.status],
        variables=to_struct({k: ("***" if k in sensitive else v) for k, v in t.variables.items()}),
        integration_ids=t.integration_ids or [], secret_ids=t.secret_ids or [], labels=t.labels or [],
        base_revision=t.base_revision, dry_run_job_id=t.dry_run_job_id, plan_add=t.plan_add,
        plan_change=t.plan_change, plan_destroy=t.plan_destroy, approval_request_id=t.approval_request_id,
        creator=t.creator, create_time=to_timestamp(t.create_time), update_time=to_timestamp(t.update_time),
        etag=t.etag, dry_run=dry_run_to_pb(t.dry_run))
    if t.description is not None:
        out.description = t.description
    if t.source_code_version_id is not None:
        out.source_code_version_id = t.source_code_version_id
    if t.workspace is not None:
        out.workspace = t.workspace
    return out


def revision_to_pb(r: Revision) -> pb.ResourceRevision:
    return pb.ResourceRevision(
        revision=r.revision, source_code_version_id=r.source_code_version_id, variables=to_struct(r.variables),
        outputs=[pb.ResourceOutput(name=o.name, value=to_value(o.value), sensitive=o.sensitive) for o in r.outputs],
        job_id=r.job_id, actor=r.actor, create_time=to_timestamp(r.create_time))


def audit_to_pb(e: AuditEntry) -> pb.ResourceAuditEntry:
    return pb.ResourceAuditEntry(id=e.id, resource_id=e.resource_id, resource_name=e.resource_name, actor=e.actor,
                                 action=e.action, revision=e.revision, before=to_struct(e.before),
                                 after=to_struct(e.after), time=to_timestamp(e.time))


def tree_node(r: Resource, children=()) -> pb.ResourceTreeNode:
    return pb.ResourceTreeNode(id=r.id, name=r.name, template_id=r.template_id, state=STATE_PB[r.state],
                               status=STATUS_PB[r.status], children=list(children))

