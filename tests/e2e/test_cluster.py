"""Many machines' engines, with failures (issue: run on many machines): a
3-node NATS JetStream cluster with R3 streams, PostgreSQL, two replicas of
every service. Ten workflows of the seed's example run; mid-run one NATS node
and one replica of each service are killed with SIGKILL and never come back.
Every workflow still finishes, every resource is applied by exactly one job,
and nothing is left queued, running, in progress or unpublished."""
from __future__ import annotations

import pytest

from tests.support.cluster_chaos import describe, run_cluster_chaos

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(600)
def test_ten_workflows_survive_losing_a_nats_node_and_a_replica_of_each_service(tmp_path, postgres):
    report = run_cluster_chaos(tmp_path, postgres, workflows=10)
    summary = describe(report)
    assert [what for _, what in report.kills] == ["NATS node 0", *[f"{s} replica a" for s in (
        "blueprint", "workflow", "resource", "executor", "approval")]], summary
    assert report.workflows_done == 10 and report.steps == report.steps_done == 30, summary
    assert report.apply_jobs == 30 and not report.duplicate_applies, summary
    assert not report.stuck and not report.errors, summary
