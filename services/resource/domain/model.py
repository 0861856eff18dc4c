"""The resource lifecycle: states x statuses, the transitions the product
document allows, variables and their rules. Pure Python."""
from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from typing import Any

MASK = "***"

# States (what the resource is / is becoming) and statuses (how that is going).
PROVISION, PROVISIONED, DESTROY, DESTROYED = "provision", "provisioned", "destroy", "destroyed"
READY, QUEUED, IN_PROGRESS, DONE, ERROR = "ready", "queued", "in_progress", "done", "error"
APPROVAL_PENDING, PENDING, REJECTED, UNKNOWN = "approval_pending", "pending", "rejected", "unknown"
BUSY = frozenset({QUEUED, IN_PROGRESS, APPROVAL_PENDING})

# Operations that run IaC (and may wait for approval).
OP_PROVISION, OP_UPDATE, OP_DESTROY, OP_DRY_RUN = "provision", "update", "destroy", "dry_run"

# "State Constraints" of the product document: current state -> allowed next states.
# One exception, for a workflow's teardown only (see Operations.destroy and
# delete): the resource of a workflow step whose provisioning failed or was
# interrupted is destroyed with its state (provision -> destroy), and one
# whose provisioning never ran is deleted; a teardown leaves nothing behind.
ALLOWED_NEXT_STATES = {
    PROVISION: {PROVISIONED, PROVISION},
    PROVISIONED: {PROVISIONED, DESTROY},
    DESTROY: {DESTROYED, PROVISIONED},
    DESTROYED: {PROVISION},
}

TS_PENDING, TS_APPROVAL_PENDING, TS_MERGED, TS_REJECTED = "pending", "approval_pending", "merged", "rejected"


@dataclass(frozen=True)
class DependencyTag:
    name: str
    value: str
    inherited_by_children: bool = False


@dataclass(frozen=True)
class DependencyConfig:
    name: str
    value: Any
    inherited_by_children: bool = False


@dataclass(frozen=True)
class Output:
    name: str
    value: Any
    sensitive: bool = False


@dataclass
class Resource:
    id: str
    name: str
    template_id: str
    source_code_version_id: str = ""
    description: str = ""
    state: str = PROVISION
    status: str = READY
    abstract: bool = False
    variables: dict[str, Any] = field(default_factory=dict)
    sensitive_variables: list[str] = field(default_factory=list)
    outputs: list[Output] = field(default_factory=list)
    parent_ids: list[str] = field(default_factory=list)
    dependency_tags: list[DependencyTag] = field(default_factory=list)
    dependency_configs: list[DependencyConfig] = field(default_factory=list)
    integration_ids: list[str] = field(default_factory=list)
    secret_ids: list[str] = field(default_factory=list)
    storage_id: str = ""
    storage_path: str = ""
    workspace: str = ""
    labels: list[str] = field(default_factory=list)
    revision: int = 1
    owners: list[str] = field(default_factory=list)
    creator: str = ""
    error_message: str = ""
    last_job_id: str = ""
    last_job_action: str = ""  # the operation last_job_id runs
    job_request_id: str = ""  # request_id of the job submission under way
    pending_operation: str = ""  # what waits for approval or runs
    # The queued operation was approved (an owner's decision, or an approved
    # workflow plan covering it): its submission need not check the approval flow again.
    operation_approved: bool = False
    temporary_state_id: str = ""  # the temporary state being applied or reviewed
    plan_job_id: str = ""  # the reviewed dry run the pending operation applies
    approval_request_id: str = ""
    workflow_id: str = ""
    step_id: str = ""
    ever_provisioned: bool = False
    last_dry_run: dict[str, Any] = field(default_factory=dict)  # see dry_run_started / dry_run_ended
    create_time: dt.datetime | None = None
    update_time: dt.datetime | None = None
    version: int = 1

    @property
    def etag(self) -> str:
        return f'"{self.version}"'

    @property
    def busy(self) -> bool:
        return self.status in BUSY

    @property
    def never_ran(self) -> bool:
        """Never provisioned, and no job was ever submitted for it (not yet
        started, rejected, withdrawn, or its job could not be submitted):
        it has no state and no infrastructure, so a teardown deletes its
        record without a destroy. (`last_job_action` is set when a job is
        submitted and never cleared; `last_job_id` is cleared when an
        operation is queued again.)"""
        return self.state == PROVISION and not self.busy and not self.ever_provisioned and not self.last_job_action

    @property
    def provisioning_left_state(self) -> bool:
        """Never provisioned, but a job ran for it (failed, interrupted,
        or queued again and then not run): part of its infrastructure may
        exist, recorded in its state, so a teardown destroys it with that
        state."""
        return self.state == PROVISION and not self.busy and not self.ever_provisioned and bool(self.last_job_action)

    def masked_variables(self) -> dict[str, Any]:
        return mask(self.variables, self.sensitive_variables)

    def masked_outputs(self) -> list[Output]:
        return [Output(o.name, MASK, True) if o.sensitive else o for o in self.outputs]

    def snapshot(self) -> dict[str, Any]:
        """What an audit entry records (sensitive values masked)."""
        return {"state": self.state, "status": self.status, "revision": self.revision,
                "description": self.description, "source_code_version_id": self.source_code_version_id,
                "variables": self.masked_variables(), "labels": list(self.labels),
                "integration_ids": list(self.integration_ids), "secret_ids": list(self.secret_ids),
                "owners": list(self.owners), "workspace": self.workspace,
                "outputs": {o.name: o.value for o in self.masked_outputs()}}


@dataclass
class TemporaryState:
    id: str
    resource_id: str
    status: str = TS_PENDING
    description: str | None = None
    source_code_version_id: str | None = None
    variables: dict[str, Any] = field(default_factory=dict)
    integration_ids: list[str] | None = None
    secret_ids: list[str] | None = None
    labels: list[str] | None = None
    workspace: str | None = None
    base_revision: int = 0
    dry_run_job_id: str = ""
    plan_add: int = 0
    plan_change: int = 0
    plan_destroy: int = 0
    dry_run: dict[str, Any] = field(default_factory=dict)  # see dry_run_started / dry_run_ended
    approval_request_id: str = ""
    creator: str = ""
    create_time: dt.datetime | None = None
    update_time: dt.datetime | None = None
    version: int = 1

    @property
    def etag(self) -> str:
        return f'"{self.version}"'

    @property
    def open(self) -> bool:
        return self.status in (TS_PENDING, TS_APPROVAL_PENDING)


@dataclass(frozen=True)
class Revision:
    resource_id: str
    revision: int
    source_code_version_id: str
    variables: dict[str, Any]
    outputs: list[Output]
    job_id: str
    actor: str
    create_time: dt.datetime


@dataclass(frozen=True)
class AuditEntry:
    id: str
    resource_id: str
    resource_name: str
    actor: str
    action: str
    revision: int
    before: dict[str, Any]
    after: dict[str, Any]
    time: dt.datetime
    seq: int = 0  # its place in the trail (assigned when stored)


def mask(values: dict[str, Any], sensitive: list[str]) -> dict[str, Any]:
    return {k: (MASK if k in sensitive else v) for k, v in values.items()}


def can_move(state: str, next_state: str) -> bool:
    return next_state in ALLOWED_NEXT_STATES.get(state, set())


_COLLECTION = re.compile(r"^(list|set|tuple)\b")
_MAPPING = re.compile(r"^(map|object)\b")


def type_problem(type_expr: str, value: Any) -> str:
    """Why `value` cannot be given for a variable of HCL type `type_expr`
    ('' when it can). Only the outer type is checked; terraform checks the rest."""
    t = (type_expr or "any").strip()
    if value is None or t in ("any", ""):
        return ""
    if t == "string":
        ok = isinstance(value, str)
    elif t == "number":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif t == "bool":
        ok = isinstance(value, bool)
    elif _COLLECTION.match(t):
        ok = isinstance(value, list)
    elif _MAPPING.match(t):
        ok = isinstance(value, dict)
    else:
        ok = True
    return "" if ok else f"must be of type {t}"


def inherited(parents: list[Resource]) -> tuple[list[DependencyTag], list[DependencyConfig]]:
    """Union of the parents' inheritable tags and configs (first parent wins a name clash)."""
    tags: dict[tuple[str, str], DependencyTag] = {}
    configs: dict[str, DependencyConfig] = {}
    for parent in parents:
        for tag in parent.dependency_tags:
            if tag.inherited_by_children:
                tags.setdefault((tag.name, tag.value), tag)
        for config in parent.dependency_configs:
            if config.inherited_by_children:
                configs.setdefault(config.name, config)
    return list(tags.values()), list(configs.values())


_PATH_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_STORAGE_PATH = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")


def valid_storage_path(path: str) -> bool:
    """The naming convention of storage paths: relative, segments of letters,
    digits, '.', '_' and '-', no '..' (the executor keeps state files under it)."""
    return bool(_STORAGE_PATH.match(path)) and ".." not in path.split("/") and len(path) <= 512


def default_storage_path(template_key: str, name: str) -> str:
    return f"{_PATH_SAFE.sub('-', template_key).strip('-')}/{_PATH_SAFE.sub('-', name).strip('-')}"


def dry_run_started(job_id: str, now: dt.datetime) -> dict[str, Any]:
    """The record of a dry run just submitted (stored as JSON)."""
    return {"job_id": job_id, "status": "queued", "plan_add": 0, "plan_change": 0, "plan_destroy": 0,
            "error_message": "", "start_time": now.isoformat(), "completion_time": ""}


def dry_run_moved(record: dict[str, Any], status: str, plan: tuple[int, int, int], error_message: str,
                  now: dt.datetime) -> dict[str, Any]:
    """The record after the plan job's event: running, or ended with its counts or error."""
    ended = status not in ("queued", "running")
    add, change, destroy = plan if status == "succeeded" else (0, 0, 0)
    return {**record, "status": status, "plan_add": add, "plan_change": change, "plan_destroy": destroy,
            "error_message": error_message if status != "succeeded" and ended else "",
            "completion_time": now.isoformat() if ended else ""}
