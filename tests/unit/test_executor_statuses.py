"""Every status a job can have is either before its end or an end. What a job
that has not ended holds (its integrations, secrets and storage: they are not
deleted under it) is found by the statuses before the end, so a status in
neither set would let them go while its jobs wait: the `waiting` status of
jobs submitted after another job once did exactly that."""
from infrakitchen.executor.v1 import executor_pb2 as pb
from services.executor.api.convert import STATUS
from services.executor.app.jobs import STATUS_EVENT
from services.executor.domain.model import NOT_ENDED, TERMINAL, Correlation, Job, Source


def test_every_job_status_is_either_before_the_end_or_an_end():
    in_the_api = {v.number for v in pb.JobStatus.DESCRIPTOR.values if v.number}
    assert in_the_api == set(STATUS), "every status of the API maps to one of the model"
    every = set(STATUS.values()) | set(STATUS_EVENT)
    assert set(NOT_ENDED) | TERMINAL == every
    assert not set(NOT_ENDED) & TERMINAL


def test_a_job_has_ended_exactly_in_the_terminal_statuses():
    job = Job("j", "apply", Source("file:///r", "v1"), {}, [], [], [], "", "s", Correlation())
    for status in STATUS.values():
        job.status = status
        assert job.ended is (status not in NOT_ENDED)
