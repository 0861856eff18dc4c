import pytest

from infrakitchen.executor.v1 import executor_pb2
from infrakitchen.events.v1 import events_pb2
from services.common import events
from services.common.config import SERVICES


def test_every_event_body_declares_a_subject_in_its_own_context():
    catalogue = events.catalogue()
    # the facts other services react to are all there
    assert {"ik.executor.job.succeeded", "ik.executor.job.failed", "ik.resource.resource.provisioned",
            "ik.approval.request.approved", "ik.approval.request.rejected", "ik.approval.flow.changed",
            "ik.workflow.step.completed"} <= set(catalogue.values())
    for field, subject in catalogue.items():
        parts = subject.split(".")
        assert parts[0] == "ik" and parts[1] in SERVICES and len(parts) == 4, (field, subject)
    assert len(set(catalogue.values())) == len(catalogue), "two bodies share a subject"


def test_new_event_fills_the_envelope():
    body = events_pb2.JobChanged(job_id="j1", status=executor_pb2.JOB_STATUS_SUCCEEDED)
    env = events.new_event("executor", "job_succeeded", body, actor="alice",
                           correlation=events.Correlation(job_id="j1", resource_id="r1"))
    assert env.type == "ik.executor.job.succeeded"
    assert env.source == "executor" and env.actor == "alice"
    assert env.correlation.resource_id == "r1"
    assert env.occur_time.seconds > 0 and len(env.event_id) == 36
    name, decoded = events.body_of(events.Envelope.FromString(env.SerializeToString()))
    assert name == "job_succeeded" and decoded.job_id == "j1"


def test_unknown_body_is_refused():
    with pytest.raises(KeyError):
        events.subject_of("event_id")
    with pytest.raises(KeyError):
        events.subject_of("no_such_thing")


def test_context_of_subject():
    assert events.context_of("ik.resource.resource.provisioned") == "resource"
    with pytest.raises(ValueError):
        events.context_of("other.subject")


def test_every_rpc_declares_its_required_role():
    from google.protobuf import descriptor_pool

    from infrakitchen.approval.v1 import approval_pb2
    from infrakitchen.blueprint.v1 import blueprint_pb2
    from infrakitchen.common.v1 import options_pb2
    from infrakitchen.resource.v1 import resource_pb2
    from infrakitchen.workflow.v1 import workflow_pb2

    pool = descriptor_pool.Default()
    methods = 0
    for module in (approval_pb2, blueprint_pb2, executor_pb2, resource_pb2, workflow_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                role = pool.FindMethodByName(method.full_name).GetOptions().Extensions[options_pb2.required_role]
                assert role != options_pb2.ROLE_UNSPECIFIED, method.full_name
                methods += 1
    assert methods > 60
