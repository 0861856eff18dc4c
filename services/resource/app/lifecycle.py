"""The resource lifecycle (resource-workflows.md): one class made of the
families of use cases, one module each. Each use case runs in the unit of
work it is given; the caller commits."""
from __future__ import annotations

from services.resource.app.approvals import Approvals
from services.resource.app.base import FLAG_KEY, JobNotRecordedYet, _OPERATION
from services.resource.app.create import CreateCases
from services.resource.app.metadata import Metadata
from services.resource.app.operations import Operations
from services.resource.app.reconciliation import Reconciliation
from services.resource.app.reviewed_plans import ReviewedPlans
from services.resource.app.temporary_states import TemporaryStates

__all__ = ["FLAG_KEY", "JobNotRecordedYet", "Lifecycle", "OPERATION_OF_APPROVAL"]


class Lifecycle(CreateCases, Operations, Metadata, TemporaryStates, Approvals, Reconciliation, ReviewedPlans):
    """Everything a resource goes through, from create to delete."""


OPERATION_OF_APPROVAL = _OPERATION
