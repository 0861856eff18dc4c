"""proto <-> workflow domain."""
from __future__ import annotations

import datetime as dt

from infrakitchen.common.v1 import retry_pb2
from infrakitchen.workflow.v1 import workflow_pb2 as pb
from services.common.values import from_struct, to_struct, to_timestamp
from services.workflow.domain.controls import CONTINUE_INDEPENDENT, STOP, Controls, RetryPolicy
from services.workflow.domain.model import (DEFERRED, DONE, ERROR, IN_PROGRESS, PENDING, PLANNED, PLANNING, Step,
                                            TeardownItem, Workflow, masked)

STATUS = {pb.WORKFLOW_STATUS_PENDING: PENDING, pb.WORKFLOW_STATUS_IN_PROGRESS: IN_PROGRESS,
          pb.WORKFLOW_STATUS_DONE: DONE, pb.WORKFLOW_STATUS_ERROR: ERROR}
STATUS_PB = {v: k for k, v in STATUS.items()}
STEP_STATUS_PB = {PENDING: pb.STEP_STATUS_PENDING, IN_PROGRESS: pb.STEP_STATUS_IN_PROGRESS,
                  DONE: pb.STEP_STATUS_DONE, ERROR: pb.STEP_STATUS_ERROR}
TEARDOWN_STATUS_PB = {"": pb.TEARDOWN_STATUS_UNSPECIFIED, PENDING: pb.TEARDOWN_STATUS_PENDING,
                      IN_PROGRESS: pb.TEARDOWN_STATUS_IN_PROGRESS, DONE: pb.TEARDOWN_STATUS_DONE,
                      ERROR: pb.TEARDOWN_STATUS_ERROR}


def overrides_from_pb(request: pb.CreateWorkflowRequest | pb.Workflow):
    variables: dict[str, dict] = {}
    for o in request.variable_overrides:
        variables.setdefault(o.template_id, {}).update(from_struct(o.variables))
    versions = {o.template_id: o.source_code_version_id for o in request.source_code_version_overrides}
    parents: dict[str, list[str]] = {}
    for o in request.parent_overrides:
        parents.setdefault(o.template_id, []).extend(o.resource_ids)
    return variables, versions, parents


FAILURE_POLICY = {pb.FAILURE_POLICY_UNSPECIFIED: STOP, pb.FAILURE_POLICY_STOP: STOP,
                  pb.FAILURE_POLICY_CONTINUE_INDEPENDENT: CONTINUE_INDEPENDENT}
FAILURE_POLICY_PB = {STOP: pb.FAILURE_POLICY_STOP, CONTINUE_INDEPENDENT: pb.FAILURE_POLICY_CONTINUE_INDEPENDENT}


def retry_policy_from_pb(r: retry_pb2.RetryPolicy) -> RetryPolicy:
    return RetryPolicy(r.max_attempts, r.initial_backoff.ToNanoseconds() / 1e9, tuple(r.transient_patterns))


def retry_policy_to_pb(d: dict) -> retry_pb2.RetryPolicy:
    r = RetryPolicy.from_json(d)
    out = retry_pb2.RetryPolicy(max_attempts=r.max_attempts, transient_patterns=list(r.transient_patterns))
    out.initial_backoff.FromNanoseconds(int(r.initial_backoff * 1e9))
    return out


def controls_from_pb(request: pb.CreateWorkflowRequest | pb.Workflow) -> Controls:
    """On-failure policy, retry policy and expiry; an unknown enum value is kept (and refused) as text."""
    ttl = request.ttl.ToNanoseconds() / 1e9 if isinstance(request, pb.CreateWorkflowRequest) else 0.0
    return Controls(on_failure=FAILURE_POLICY.get(request.on_failure, f"unknown ({request.on_failure})"),
                    retry_policy=retry_policy_from_pb(request.retry_policy),
                    expire_time=request.expire_time.ToDatetime(dt.timezone.utc)
                    if request.HasField("expire_time") else None, ttl_seconds=ttl)


PLAN_STATUS_PB = {"": pb.PLAN_STATUS_UNSPECIFIED, IN_PROGRESS: pb.PLAN_STATUS_IN_PROGRESS,
                  DONE: pb.PLAN_STATUS_DONE, ERROR: pb.PLAN_STATUS_ERROR}
STEP_PLAN_STATUS_PB = {PLANNING: pb.STEP_PLAN_STATUS_PLANNING, PLANNED: pb.STEP_PLAN_STATUS_PLANNED,
                       DEFERRED: pb.STEP_PLAN_STATUS_DEFERRED, ERROR: pb.STEP_PLAN_STATUS_ERROR}


def step_plan_to_pb(plan: dict) -> pb.StepPlan | None:
    if not plan:
        return None
    return pb.StepPlan(
        status=STEP_PLAN_STATUS_PB.get(plan.get("status", ""), pb.STEP_PLAN_STATUS_UNSPECIFIED),
        job_id=plan.get("job_id", ""), add=plan.get("add", 0), change=plan.get("change", 0),
        destroy=plan.get("destroy", 0),
        changes=[pb.PlannedChange(address=a, action=act) for a, act in plan.get("changes", [])],
        inputs_hash=plan.get("inputs_hash", ""), error_message=plan.get("error_message", ""),
        deferred_inputs=[pb.DeferredInput(**d) for d in plan.get("deferred_inputs", [])],
        state_path=plan.get("state_path", ""), state_serial=plan.get("state_serial", 0),
        replan_reason=plan.get("replan_reason", ""), approval_request_id=plan.get("approval_request_id", ""))


def step_to_pb(st: Step, w: Workflow, resource_of: dict[str, str]) -> pb.Step:
    # Parents from the template hierarchy (the resources of the upstream
    # steps, once they exist), then the overrides (external parents).
    parents = list(dict.fromkeys([*(resource_of[t] for t in st.parent_template_ids if resource_of.get(t)),
                                  *st.parent_resource_ids]))
    return pb.Step(
        id=st.id, template_id=st.template_id, template_name=st.template_name, resource_id=st.resource_id,
        position=st.position, status=STEP_STATUS_PB[st.status], error_message=st.error_message,
        waiting_reason=st.waiting_reason, resolved_variables=to_struct(st.resolved_variables),
        parent_resource_ids=parents, integration_ids=w.integration_ids, secret_ids=w.secret_ids,
        source_code_version_id=st.source_code_version_id, storage_id=w.storage_id,
        depends_on_step_ids=st.depends_on, job_id=st.job_id, start_time=to_timestamp(st.start_time),
        completion_time=to_timestamp(st.completion_time), teardown_status=TEARDOWN_STATUS_PB[st.teardown_status],
        teardown_error_message=st.teardown_error_message, teardown_job_id=st.teardown_job_id,
        plan=step_plan_to_pb(st.plan), attempts=st.attempts, attempt_job_ids=st.attempt_job_ids,
        retry_time=to_timestamp(st.retry_time))


def workflow_to_pb(w: Workflow, steps: list[Step]) -> pb.Workflow:
    sensitive = {s.template_id: s.sensitive_variables for s in steps}
    resource_of = {s.template_id: s.resource_id for s in steps}
    return pb.Workflow(
        id=w.id, blueprint_id=w.blueprint_id, blueprint_revision=w.blueprint_revision, status=STATUS_PB[w.status],
        error_message=w.error_message, steps=[step_to_pb(s, w, resource_of) for s in steps],
        wiring_snapshot=[pb.WiringRule(source_template_id=r.source_template_id, source_output=r.source_output,
                                       target_template_id=r.target_template_id, target_variable=r.target_variable)
                         for r in w.wiring],
        variable_overrides=[pb.TemplateVariables(template_id=t, variables=to_struct(masked(v, sensitive.get(t, []))))
                            for t, v in w.variable_overrides.items()],
        source_code_version_overrides=[pb.SourceCodeVersionOverride(template_id=t, source_code_version_id=v)
                                       for t, v in w.version_overrides.items()],
        parent_overrides=[pb.ParentOverride(template_id=t, resource_ids=r) for t, r in w.parent_overrides.items()],
        integration_ids=w.integration_ids, secret_ids=w.secret_ids, storage_id=w.storage_id,
        max_parallel_steps=w.max_parallel_steps, creator=w.creator, create_time=to_timestamp(w.create_time),
        start_time=to_timestamp(w.start_time), completion_time=to_timestamp(w.completion_time),
        update_time=to_timestamp(w.update_time), etag=w.etag,
        teardown_status=TEARDOWN_STATUS_PB[w.teardown_status], teardown_error_message=w.teardown_error_message,
        teardown_start_time=to_timestamp(w.teardown_start_time),
        teardown_completion_time=to_timestamp(w.teardown_completion_time),
        plan_status=PLAN_STATUS_PB[w.plan_status], plan_error_message=w.plan_error_message,
        plan_start_time=to_timestamp(w.plan_start_time), plan_completion_time=to_timestamp(w.plan_completion_time),
        plan_id=w.plan_id, executed_plan_id=w.executed_plan_id, plan_approval_request_id=w.plan_approval_request_id,
        plan_approval_status=w.plan_approval_status, on_failure=FAILURE_POLICY_PB.get(w.on_failure, 0),
        retry_policy=retry_policy_to_pb(w.retry_policy), expire_time=to_timestamp(w.expire_time),
        expired=w.expired, cancelled_by=w.cancelled_by)


def teardown_to_pb(items: list[TeardownItem], external: dict[str, list[str]]) -> pb.PreviewWorkflowTeardownResponse:
    return pb.PreviewWorkflowTeardownResponse(steps=[pb.TeardownStep(
        resource_id=i.step.resource_id, template_id=i.step.template_id, level=i.level,
        blocked_by_resource_ids=[d.resource_id for d in i.blocked_by], step_id=i.step.id,
        template_name=i.step.template_name, external_dependent_resource_ids=external.get(i.step.id, []))
        for i in items])
