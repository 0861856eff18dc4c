"""Approval requests, decisions and who may make them. Pure Python."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

PROVISION, UPDATE, DESTROY, WORKFLOW_PLAN = "provision", "update", "destroy", "workflow_plan"
OPERATIONS = (PROVISION, UPDATE, DESTROY, WORKFLOW_PLAN)

PENDING, APPROVED, REJECTED, CANCELLED = "pending", "approved", "rejected", "cancelled"


@dataclass(frozen=True)
class Decision:
    user: str
    outcome: str  # approved | rejected | cancelled
    comment: str
    time: dt.datetime


@dataclass
class ApprovalRequest:
    id: str
    resource_id: str
    resource_name: str
    operation: str
    requester: str
    revision: int = 0
    temporary_state_id: str = ""
    plan_job_id: str = ""
    plan_add: int = 0
    plan_change: int = 0
    plan_destroy: int = 0
    workflow_id: str = ""
    status: str = PENDING
    decisions: list[Decision] = field(default_factory=list)
    owners: list[str] = field(default_factory=list)
    create_time: dt.datetime | None = None
    update_time: dt.datetime | None = None
    version: int = 1
    # A workflow plan's request: the plan, the step (one step's new plan) and
    # each step's plan as shown (dicts of the PlannedStep fields).
    workflow_plan_id: str = ""
    step_id: str = ""
    planned_steps: list[dict] = field(default_factory=list)

    @property
    def etag(self) -> str:
        return f'"{self.version}"'

    @property
    def pending(self) -> bool:
        return self.status == PENDING


def may_decide(user: str, is_admin: bool, owners: list[str]) -> bool:
    """The role table: owners and admins approve or reject; writers (a
    requester who owns nothing included) and readers do not."""
    return is_admin or user in owners


def may_cancel(user: str, is_admin: bool, owners: list[str], requester: str) -> bool:
    """A request can be withdrawn by whoever made it, or by those who could decide it."""
    return may_decide(user, is_admin, owners) or user == requester


@dataclass
class ApprovalFlow:
    enabled: bool = False
    updated_by: str = ""
    update_time: dt.datetime | None = None
