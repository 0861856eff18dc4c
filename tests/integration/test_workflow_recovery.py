"""Fix and resume (workflows.md, "Error Recovery") and what a workflow's
steps take from outside, through gRPC with the other services, real NATS and
real terraform: a step failing on the workflow's own input is fixed with
UpdateWorkflow and re-executed (done steps applied once); parents from the
template hierarchy show on the step; external templates' resources are
checked and their outputs wired; overrides of unknown variables and values
without a kind are refused."""
from __future__ import annotations

import grpc
import pytest
from google.protobuf import struct_pb2

from infrakitchen.executor.v1 import executor_pb2 as ep
from infrakitchen.resource.v1 import resource_pb2 as rp
from infrakitchen.workflow.v1 import workflow_pb2 as wp
from services.common.auth import Role
from tests.support.grpc_asserts import field_violations, precondition_violations, rpc_error
from tests.support.jobs import all_logs, log_text
from tests.support.platform import Platform
from tests.integration.test_workflows import by_template, overrides, run, shared

DONE, ERROR, PENDING = wp.STEP_STATUS_DONE, wp.STEP_STATUS_ERROR, wp.STEP_STATUS_PENDING


@pytest.fixture
async def p(tmp_path, event_prefix, nats_url):
    async with Platform(tmp_path, event_prefix, nats_url) as platform:
        yield platform


async def test_a_bad_override_is_fixed_with_update_workflow_and_the_re_execution_finishes(p):
    gate = p.shared / "gate-open"
    gate.write_text("open")
    blueprint = await p.blueprint_of("chain", {"network": {"cidr": "10.0.0.0/16"}, "gated": {},
                                               "leaf": {}},
                                     [("gated", "gate", "leaf", "upstream")])
    w = await p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(
        blueprint_id=blueprint.id, variable_overrides=overrides(p, gated={"gate": str(p.shared / "nope")}),
        **shared(p)), metadata=p.md)
    failed = await run(p, w)
    assert failed.status == wp.WORKFLOW_STATUS_ERROR
    steps = by_template(p, failed)
    assert (steps["network"].status, steps["gated"].status, steps["leaf"].status) == (DONE, ERROR, PENDING)
    # Parents from the template hierarchy show on the step (gated's parent is network).
    assert list(steps["gated"].parent_resource_ids) == [steps["network"].resource_id]
    gated_resource = steps["gated"].resource_id
    # The step fails on the job's end event; the resource service applies the same event on its own.
    before = await p.wait(gated_resource, rp.RESOURCE_STATE_PROVISION, rp.RESOURCE_STATUS_ERROR)
    assert before.revision == 1

    # An override of a done step is refused, naming the step; nothing changes.
    err = await rpc_error(p.workflow.UpdateWorkflow(wp.UpdateWorkflowRequest(workflow=wp.Workflow(
        id=w.id, variable_overrides=overrides(p, network={"cidr": "10.9.0.0/16"}))), metadata=p.md))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    [(kind, subject, description)] = precondition_violations(err)
    assert kind == "STEP_DONE" and subject == f"steps/{steps['network'].id}" and "Network" in description
    # So is a variable the module does not have, and a stale etag.
    err = await rpc_error(p.workflow.UpdateWorkflow(wp.UpdateWorkflowRequest(workflow=wp.Workflow(
        id=w.id, variable_overrides=overrides(p, gated={"gate": str(gate), "nope": 1}))), metadata=p.md))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(field_violations(err)) == [f"variable_overrides[{p.catalog.templates['gated']}].nope"]
    err = await rpc_error(p.workflow.UpdateWorkflow(wp.UpdateWorkflowRequest(workflow=wp.Workflow(
        id=w.id, etag='"1"', variable_overrides=overrides(p, gated={"gate": str(gate)}))), metadata=p.md))
    assert err.code() == grpc.StatusCode.ABORTED
    unchanged = await p.workflow.GetWorkflow(wp.GetWorkflowRequest(id=w.id), metadata=p.md)
    assert unchanged.etag == failed.etag

    # The fix.
    fixed = await p.workflow.UpdateWorkflow(wp.UpdateWorkflowRequest(workflow=wp.Workflow(
        id=w.id, etag=failed.etag, variable_overrides=overrides(p, gated={"gate": str(gate)})),
        update_mask=["variable_overrides"]), metadata=p.md)
    assert by_template(p, fixed)["gated"].resolved_variables["gate"] == str(gate)
    assert fixed.status == wp.WORKFLOW_STATUS_ERROR and fixed.etag != failed.etag

    done = await run(p, fixed)
    assert done.status == wp.WORKFLOW_STATUS_DONE, done.error_message
    steps = by_template(p, done)
    assert steps["gated"].resource_id == gated_resource, "the same resource, corrected"
    assert steps["leaf"].resolved_variables["upstream"] == str(gate)
    corrected = await p.wait(gated_resource, rp.RESOURCE_STATE_PROVISIONED, rp.RESOURCE_STATUS_DONE)
    assert corrected.variables["gate"] == str(gate) and corrected.revision == 2
    audit = await p.resource.ListResourceEvents(rp.ListResourceEventsRequest(resource_id=gated_resource),
                                                metadata=p.md)
    assert "inputs_updated" in [e.action for e in audit.entries]
    jobs = await p.executor.ListJobs(ep.ListJobsRequest(workflow_id=w.id), metadata=p.md)
    applies = [j.correlation.resource_id for j in jobs.jobs if j.action == ep.JOB_ACTION_APPLY]
    assert applies.count(steps["network"].resource_id) == 1, "the done step is applied once"
    # Once it ran, nothing more changes.
    err = await rpc_error(p.workflow.UpdateWorkflow(wp.UpdateWorkflowRequest(workflow=wp.Workflow(
        id=w.id, variable_overrides=overrides(p, gated={"gate": "x"}))), metadata=p.md))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_external_templates_outputs_are_wired_and_bad_stand_ins_refused(p):
    net = await p.provisioned("network", "outside-net", variables={"cidr": "10.3.0.0/16"})
    vpc_id = {o.name: o.value.string_value for o in net.outputs}["vpc_id"]
    blueprint = await p.blueprint_of("on-existing-network", {"network": {}, "app": {}},
                                     [("network", "vpc_id", "app", "vpc_id")],
                                     network={"external": True})
    network_tid = p.catalog.templates["network"]

    async def refused(resource_ids):
        return await rpc_error(p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(
            blueprint_id=blueprint.id, parent_overrides=[wp.ParentOverride(template_id=network_tid,
                                                                           resource_ids=resource_ids)],
            **shared(p)), metadata=p.md))
    unready = await p.create("network", "not-yet", variables={"cidr": "10.4.0.0/16"})
    app_like = await p.create("team", "a-team")
    for ids, says in (([unready.id], "not provisioned"), ([app_like.id], "another template"),
                      (["missing"], "unknown resource")):
        err = await refused(ids)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert says in field_violations(err)[f"parent_overrides[{network_tid}].resource_ids[0]"]

    w = await p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(
        blueprint_id=blueprint.id, parent_overrides=[wp.ParentOverride(template_id=network_tid,
                                                                       resource_ids=[net.id])], **shared(p)),
        metadata=p.md)
    app_step = by_template(p, w)["app"]
    assert app_step.resolved_variables["vpc_id"] == vpc_id and list(app_step.parent_resource_ids) == [net.id]
    done = await run(p, w)
    assert done.status == wp.WORKFLOW_STATUS_DONE, done.error_message
    app = await p.wait(by_template(p, done)["app"].resource_id, rp.RESOURCE_STATE_PROVISIONED,
                       rp.RESOURCE_STATUS_DONE)
    assert app.variables["vpc_id"] == vpc_id and list(app.parent_ids) == [net.id]


async def test_overrides_of_unknown_variables_and_values_without_a_kind_are_refused(p):
    blueprint = await p.blueprint_of("one", {"network": {"cidr": "10.0.0.0/16"}}, [])
    err = await rpc_error(p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(
        blueprint_id=blueprint.id, variable_overrides=overrides(p, network={"cidrr": "10.1.0.0/16"}), **shared(p)),
        metadata=p.md))
    tid = p.catalog.templates["network"]
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    [(field, why)] = field_violations(err).items()
    assert field == f"variable_overrides[{tid}].cidrr"
    assert why.startswith("Network has no variable 'cidrr' at its source code version; its variables: ")
    assert "cidr," in why or why.endswith("cidr")  # the names it has, to pick from
    kindless = wp.TemplateVariables(template_id=tid)
    kindless.variables.fields["cidr"].CopyFrom(struct_pb2.Value())  # what a client that lost the kind sends
    err = await rpc_error(p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(
        blueprint_id=blueprint.id, variable_overrides=[kindless], **shared(p)), metadata=p.md))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(field_violations(err)) == ["variable_overrides[0].variables.cidr"]
    listed = await p.workflow.ListWorkflows(wp.ListWorkflowsRequest(), metadata=p.md)
    assert not listed.workflows, "nothing was stored"


async def test_a_sensitive_output_wired_downstream_stays_sensitive_there(p):
    """app's secret_url is a sensitive output (it carries the password);
    wired into tail's plain `upstream` variable it is sensitive on tail too:
    masked for readers on the resource, its audit trail, revisions and job,
    absent from the job log, and tail's output derived from it is sensitive."""
    canary = "hunter2-canary-7f3a"
    blueprint = await p.blueprint_of("secret-chain", {"network": {"cidr": "10.0.0.0/16"}, "app": {}, "tail": {}},
                                     [("network", "vpc_id", "app", "vpc_id"), ("app", "secret_url", "tail",
                                                                                "upstream")])
    w = await p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(
        blueprint_id=blueprint.id, variable_overrides=overrides(p, app={"password": canary}), **shared(p)),
        metadata=p.md)
    done = await run(p, w)
    assert done.status == wp.WORKFLOW_STATUS_DONE, done.error_message
    tail_step = by_template(p, done)["tail"]
    assert tail_step.resolved_variables["upstream"] == "***"
    reader = p.as_("rita", Role.READ)
    tail = await p.wait(tail_step.resource_id, rp.RESOURCE_STATE_PROVISIONED, rp.RESOURCE_STATUS_DONE)
    tail = await p.resource.GetResource(rp.GetResourceRequest(id=tail.id), metadata=reader)
    assert tail.variables["upstream"] == "***"
    assert {o.name: (o.sensitive, o.value.string_value) for o in tail.outputs}["seen"] == (True, "***")
    seen = [str(tail), str(done)]
    seen.append(str(await p.resource.ListResourceEvents(rp.ListResourceEventsRequest(resource_id=tail.id),
                                                        metadata=reader)))
    seen.append(str(await p.resource.ListResourceRevisions(rp.ListResourceRevisionsRequest(resource_id=tail.id),
                                                           metadata=reader)))
    seen.append(str(await p.executor.GetJob(ep.GetJobRequest(id=tail.last_job_id), metadata=reader)))
    seen.append(log_text(await all_logs(p.executor, tail.last_job_id, reader)))
    assert not [text for text in seen if canary in text]
