"""Workflows and steps (workflows.md). Pure Python: statuses, variable
resolution with the document's precedence, and ready-queue scheduling."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

PENDING, IN_PROGRESS, DONE, ERROR = "pending", "in_progress", "done", "error"
MASK = "***"


@dataclass(frozen=True)
class WiringRule:
    source_template_id: str
    source_output: str
    target_template_id: str
    target_variable: str


@dataclass
class Step:
    id: str
    workflow_id: str
    template_id: str
    template_name: str
    position: int
    depends_on: list[str] = field(default_factory=list)  # step ids
    status: str = PENDING
    error_message: str = ""
    waiting_reason: str = ""
    source_code_version_id: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)  # blueprint defaults
    overrides: dict[str, Any] = field(default_factory=dict)  # runtime overrides
    resolved_variables: dict[str, Any] = field(default_factory=dict)
    sensitive_variables: list[str] = field(default_factory=list)
    parent_template_ids: list[str] = field(default_factory=list)  # parents inside the blueprint
    parent_resource_ids: list[str] = field(default_factory=list)  # overrides (external parents)
    resource_id: str = ""
    job_id: str = ""
    outputs: dict[str, Any] = field(default_factory=dict)
    sensitive_outputs: list[str] = field(default_factory=list)
    start_time: dt.datetime | None = None
    completion_time: dt.datetime | None = None
    # The destroy of this step's resource during a teardown ("": not part of one).
    teardown_status: str = ""
    teardown_error_message: str = ""
    teardown_job_id: str = ""
    teardown_start_time: dt.datetime | None = None
    # Its part of the workflow's last plan: status (planning, planned,
    # deferred, error), job_id, add/change/destroy, changes [[address,
    # action]], inputs_hash, deferred_inputs, error_message, state_path,
    # state_serial; request_id (of its plan job), queued (waits for a free
    # planning slot); during an execution also replan_reason, deferred (it
    # was deferred in the approved plan), approved_changes (what the approved
    # plan showed) and approval_request_id (of its new plan).
    plan: dict[str, Any] = field(default_factory=dict)
    # Attempts of its current run (a transient failure is retried), each
    # attempt's job, and when the next attempt starts.
    attempts: int = 0
    attempt_job_ids: list[str] = field(default_factory=list)
    retry_time: dt.datetime | None = None
    retry_default: dict[str, Any] = field(default_factory=dict)  # its template's retry policy, at create
    version: int = 1


@dataclass
class Workflow:
    id: str
    blueprint_id: str
    blueprint_revision: int
    status: str = PENDING
    error_message: str = ""
    wiring: list[WiringRule] = field(default_factory=list)
    variable_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    version_overrides: dict[str, str] = field(default_factory=dict)
    parent_overrides: dict[str, list[str]] = field(default_factory=dict)
    integration_ids: list[str] = field(default_factory=list)
    secret_ids: list[str] = field(default_factory=list)
    storage_id: str = ""
    max_parallel_steps: int = 0  # 0: no limit
    creator: str = ""
    executor: str = ""  # who executed it last
    create_time: dt.datetime | None = None
    start_time: dt.datetime | None = None
    completion_time: dt.datetime | None = None
    update_time: dt.datetime | None = None
    # A teardown destroys the workflow's resources; status keeps describing the execution.
    teardown_status: str = ""  # "": never torn down
    teardown_error_message: str = ""
    torn_down_by: str = ""
    teardown_start_time: dt.datetime | None = None
    teardown_completion_time: dt.datetime | None = None
    # The last PlanWorkflow ("": never planned; in_progress, done, error).
    plan_status: str = ""
    plan_error_message: str = ""
    plan_start_time: dt.datetime | None = None
    plan_completion_time: dt.datetime | None = None
    plan_id: str = ""  # names the last plan
    executed_plan_id: str = ""  # the plan the execution applies ("": none, a fresh apply)
    # With the approval flow on: the whole plan's approval request and its status.
    plan_approval_request_id: str = ""
    plan_approval_status: str = ""
    on_failure: str = "stop"  # or continue_independent (domain.controls)
    retry_policy: dict[str, Any] = field(default_factory=dict)  # controls.RetryPolicy as JSON
    expire_time: dt.datetime | None = None
    expired: bool = False
    cancelled_by: str = ""  # who cancelled the running (or last) execution
    version: int = 1

    @property
    def etag(self) -> str:
        return f'"{self.version}"'

    @property
    def ended(self) -> bool:
        return self.status in (DONE, ERROR)


def resolve_variables(step: Step, wiring: list[WiringRule], upstream: dict[str, Step]) -> dict[str, Any]:
    """Blueprint defaults < wired outputs of completed upstream steps < runtime
    overrides (highest wins). `upstream` maps template id -> its done step."""
    values = dict(step.defaults)
    for rule in wiring:
        if rule.target_template_id != step.template_id:
            continue
        source = upstream.get(rule.source_template_id)
        if source is not None and rule.source_output in source.outputs:
            values[rule.target_variable] = source.outputs[rule.source_output]
    values.update(step.overrides)
    return values


def ready_steps(workflow: Workflow, steps: list[Step], level_barrier: bool = False) -> list[Step]:
    """Pending steps whose own dependencies are all done (not their whole
    level), in position order, within the workflow's parallelism limit.
    `level_barrier` is the schedule peers use, kept for the benchmark's
    measured comparison: a step also waits for every step of lower
    positions (its whole previous level) to be done."""
    done = {s.id for s in steps if s.status == DONE}
    running = sum(1 for s in steps if s.status == IN_PROGRESS)
    level = min((s.position for s in steps if s.status != DONE), default=0)
    ready = sorted((s for s in steps if s.status == PENDING and all(d in done for d in s.depends_on)
                    and (not level_barrier or s.position == level)),
                   key=lambda s: (s.position, s.template_name))
    if workflow.max_parallel_steps > 0:
        ready = ready[:max(0, workflow.max_parallel_steps - running)]
    return ready


def masked(values: dict[str, Any], sensitive: list[str]) -> dict[str, Any]:
    return {k: (MASK if k in sensitive else v) for k, v in values.items()}


@dataclass(frozen=True)
class TeardownItem:
    step: Step
    level: int  # resources of one level may be destroyed at the same time
    blocked_by: tuple[Step, ...]  # steps whose resources must be destroyed first


def teardown_order(steps: list[Step]) -> list[TeardownItem]:
    """The given steps (those whose resources still exist) in reverse
    dependency order: a step's resource goes only after the resources of every
    step that depends on it. Level 0 has no dependents among them."""
    by_id = {s.id: s for s in steps}
    dependents: dict[str, list[Step]] = {s.id: [] for s in steps}
    for s in steps:
        for d in s.depends_on:
            if d in dependents:
                dependents[d].append(s)
    levels: dict[str, int] = {}

    def level(step_id: str) -> int:
        if step_id not in levels:
            levels[step_id] = 1 + max((level(d.id) for d in dependents[step_id]), default=-1)
        return levels[step_id]

    items = [TeardownItem(s, level(s.id), tuple(sorted(dependents[s.id], key=lambda d: d.position)))
             for s in by_id.values()]
    return sorted(items, key=lambda i: (i.level, -i.step.position, i.step.template_name))


def teardown_ready(workflow: Workflow, steps: list[Step]) -> list[Step]:
    """Steps waiting in a teardown whose dependents' resources are all
    destroyed, within the workflow's parallelism limit."""
    in_teardown = {s.id: s for s in steps if s.teardown_status}
    blocked = {d for s in in_teardown.values() if s.teardown_status != DONE for d in s.depends_on}
    running = sum(1 for s in in_teardown.values() if s.teardown_status == IN_PROGRESS)
    ready = sorted((s for s in in_teardown.values() if s.teardown_status == PENDING and s.id not in blocked),
                   key=lambda s: (-s.position, s.template_name))
    if workflow.max_parallel_steps > 0:
        ready = ready[:max(0, workflow.max_parallel_steps - running)]
    return ready


# --- planning ------------------------------------------------------------------------

PLANNING, PLANNED, DEFERRED = "planning", "planned", "deferred"


def deferred_inputs(step: Step, wiring: list[WiringRule], steps_by_template: dict[str, Step]) -> list[dict]:
    """The inputs of `step` that are not known before upstream steps run: a
    wired variable (not overridden at runtime, which would win) whose source
    step is not done. External templates' resources exist, so their outputs
    are known."""
    unknown = []
    for rule in wiring:
        if rule.target_template_id != step.template_id or rule.target_variable in step.overrides:
            continue
        source = steps_by_template.get(rule.source_template_id)
        if source is not None and source.status != DONE:
            unknown.append({"variable": rule.target_variable, "source_step_id": source.id,
                            "source_template_id": rule.source_template_id, "source_output": rule.source_output})
    return unknown


def awaiting_approval(resource_id: str, request_id: str, destroy: bool = False) -> str:
    """A step's waiting reason while its resource's operation waits for an
    owner: it names the request to approve (`ik approval approve <id>`)."""
    what = f"the destroy of resource {resource_id}" if destroy else f"resource {resource_id}"
    return f"{what} waits for an owner's approval" + (f" (request {request_id})" if request_id else "")


def step_state_path(workflow_id: str, step_id: str) -> str:
    """Where a step's resource keeps its state when the step was planned
    before its resource existed: its plan is made there, and applied there."""
    return f"workflows/{workflow_id}/{step_id}"


def only_creates(changes: list[list[str]]) -> bool:
    """A plan that creates resources and updates, replaces or deletes nothing."""
    return all(action == "create" for _, action in changes)


def plan_stays_approved(plan: dict[str, Any]) -> bool:
    """Whether a step's plan made during the execution goes on without a new
    approval: a deferred step's plan that only creates resources. A plan
    made again because it went stale always asks again."""
    return plan.get("deferred", False) and not plan.get("replan_reason", "").startswith("STALE_PLAN") \
        and only_creates(plan.get("changes", []))


def plan_action(actions: list[str] | tuple[str, ...]) -> str:
    """Terraform's action list as one word: create, update, replace, delete."""
    actions = tuple(actions)
    if set(actions) == {"create", "delete"}:
        return "replace"
    return "+".join(actions) if len(actions) != 1 else actions[0]


def inputs_hash(version_id: str, variables: dict[str, Any], key: bytes) -> str:
    """What a plan was made from: a changed input makes the plan stale. Keyed
    (HMAC-SHA-256 with a key of the service's own): a reader sees the hash and
    the non-sensitive variables, and must not be able to test guesses of a
    sensitive one against it."""
    import hashlib
    import hmac
    import json
    text = json.dumps({"version": version_id, "variables": variables}, sort_keys=True, default=str)
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()
