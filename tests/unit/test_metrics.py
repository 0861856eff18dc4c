"""Metrics of what a transaction did count only once it committed."""
import asyncio

from services.common import metrics


class Transaction:
    """Stands in for a unit of work: keeps after-commit actions, runs them on commit."""

    def __init__(self):
        self.actions = []

    def after_commit(self, action):
        self.actions.append(action)

    async def commit(self):
        for action in self.actions:
            await action()

    def rollback(self):
        self.actions = []


def sample(outcome: str) -> float:
    """How many step durations with this outcome were observed."""
    return next(s.value for m in metrics.STEPS.collect() for s in m.samples
                if s.name.endswith("_count") and s.labels.get("outcome") == outcome)


def test_a_metric_is_recorded_at_commit_and_not_for_a_rolled_back_transaction():
    metrics.STEPS.labels("done")  # the series exists from here on
    before = sample("done")
    rolled_back = Transaction()
    metrics.after_commit(rolled_back, lambda: metrics.STEPS.labels("done").observe(1.0))
    rolled_back.rollback()
    asyncio.run(rolled_back.commit())
    assert sample("done") == before
    committed = Transaction()
    metrics.after_commit(committed, lambda: metrics.STEPS.labels("done").observe(1.0))
    assert sample("done") == before  # not before the commit
    asyncio.run(committed.commit())
    assert sample("done") == before + 1
