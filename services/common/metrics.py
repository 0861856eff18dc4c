"""Prometheus metrics of a service (prometheus-client), served on its own
HTTP port when IK_<SVC>_METRICS_PORT (or IK_METRICS_PORT) is set; off by
default. Label values are bounded sets (methods, codes, actions, outcomes,
statuses, consumer names), never ids or user input."""
from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_SLOW = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

RPC_DURATION = Histogram("ik_rpc_duration_seconds", "gRPC calls served, by method and status code",
                         ["service", "method", "code"], buckets=_FAST)
JOBS = Counter("ik_jobs_total", "Jobs that ended, by action and outcome", ["action", "outcome"])
JOB_DURATION = Histogram("ik_job_duration_seconds", "Jobs from start to end, by action", ["action"],
                         buckets=_SLOW)
JOB_QUEUED = Histogram("ik_job_queue_seconds", "Jobs from submission to start (queue and dispatch)",
                       buckets=_FAST + (30, 60, 300))
STEP_HOLDS = Counter("ik_executor_step_holds_total", "Workers kept for a workflow's next step after its step's job "
                     "succeeded, by outcome (taken: the next step came; expired: it did not in time; late: a "
                     "next step that had missed its hold was taken from the queue first)", ["outcome"])
EVENTS_REJECTED = Counter("ik_events_rejected_total", "Events a consumer did not apply: not signed by the service "
                          "owning their subject (dead-lettered unread), or not confirmed by it (reason "
                          "unconfirmed)", ["consumer", "reason"])
DEAD_LETTERS = Counter("ik_dead_letters_total", "Events a consumer gave up on (dead-lettered)", ["consumer"])
OUTBOX_PUBLISHED = Counter("ik_outbox_published_total", "Events the outbox relay published", ["service"])
WORKFLOWS = Histogram("ik_workflow_duration_seconds", "Executions from start to their end, by outcome",
                      ["outcome"], buckets=_SLOW)
CONSUMER_PENDING = Gauge("ik_consumer_pending", "Events a durable consumer has not acknowledged yet (its lag)",
                         ["consumer"])
OUTBOX_BACKLOG = Gauge("ik_outbox_backlog", "Events stored and not yet published")
OUTBOX_OLDEST = Gauge("ik_outbox_oldest_seconds", "Age of the oldest event not yet published (0: none)")
JOBS_NOW = Gauge("ik_jobs_current", "Jobs queued (the queue's depth) or running now, by status", ["status"])
STEPS = Histogram("ik_step_duration_seconds", "Steps from start to their end, by outcome", ["outcome"],
                  buckets=_SLOW)


def serve(service: str, env: dict[str, str], host: str) -> int:
    """Starts the metrics endpoint if a port is set; returns it (0: off)."""
    port = int(env.get(f"IK_{service.upper()}_METRICS_PORT") or env.get("IK_METRICS_PORT") or 0)
    if port:
        start_http_server(port, addr=host)
        log.info("metrics on http://%s:%d/metrics", host, port)
    return port


def seconds_between(start, end) -> float:
    return max(0.0, (end - start).total_seconds()) if start is not None and end is not None else 0.0


def after_commit(uow, record: Callable[[], None]) -> None:
    """Records a metric of what a transaction did once it is committed: a
    rolled-back transaction did nothing, and counts nothing."""
    async def run() -> None:
        record()
    uow.after_commit(run)
