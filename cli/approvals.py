"""`ik approval …`: the requests waiting for you, approve, reject."""
from __future__ import annotations

from typing import Optional

import typer

from cli.connection import Client, console, fail
from cli.output import emit, enum_name, table, wants_json
from infrakitchen.approval.v1 import approval_pb2 as ap

approval_app = typer.Typer(help="List approval requests, approve or reject them; the approval flow.",
                           no_args_is_help=True)


@approval_app.command("list")
def approval_list(mine: bool = typer.Option(True, "--mine/--all",
                                            help="Only pending requests you may decide (default), or all."),
                  resource: str = typer.Option("", help="Requests about this resource."),
                  token: Optional[str] = typer.Option(None)) -> None:
    """Approval requests: by default the pending ones waiting for your decision."""
    client = Client(token)
    found = client.collect(client.approval.ListApprovalRequests,
                           ap.ListApprovalRequestsRequest(awaiting_my_decision=mine, resource_id=resource),
                           "approval_requests")

    def render():
        t = table("id", "operation", "about", "requester", "status", "plan")
        for r in found:
            t.add_row(r.id, enum_name(ap.ApprovalOperation, r.operation, "APPROVAL_OPERATION_"), _about(r),
                      r.requester, enum_name(ap.ApprovalStatus, r.status, "APPROVAL_STATUS_"), _plan(r))
        return t
    emit(found, render)


def _about(r: ap.ApprovalRequest) -> str:
    """What the request is about: a resource, or a workflow's plan (or one step of it)."""
    if r.resource_id:
        return f"{r.resource_name} ({r.resource_id})"
    if r.workflow_id:
        step = next((s.template_name for s in r.planned_steps if s.step_id == r.step_id), "") if r.step_id else ""
        return f"workflow {r.workflow_id}" + (f", step {step}" if step else f", plan {r.workflow_plan_id}")
    return ""


def _plan(r: ap.ApprovalRequest) -> str:
    """The plan's changes: the resource's, or every planned step's added up."""
    if r.plan_job_id:
        return f"+{r.plan_add} ~{r.plan_change} -{r.plan_destroy}"
    if r.planned_steps:
        add = sum(s.add for s in r.planned_steps)
        change = sum(s.change for s in r.planned_steps)
        destroy = sum(s.destroy for s in r.planned_steps)
        deferred = sum(1 for s in r.planned_steps if s.status == "deferred")
        return f"+{add} ~{change} -{destroy} in {len(r.planned_steps)} steps" + (
            f" ({deferred} deferred)" if deferred else "")
    return ""


@approval_app.command("approve")
def approval_approve(request_id: str, comment: str = typer.Option("", help="Why."),
                     token: Optional[str] = typer.Option(None)) -> None:
    """Approves a request (its resource's owners and admins may)."""
    client = Client(token)
    _decided(client(client.approval.ApproveRequest, ap.ApproveRequestRequest(id=request_id, comment=comment)))


@approval_app.command("reject")
def approval_reject(request_id: str, comment: str = typer.Option("", help="Why."),
                    token: Optional[str] = typer.Option(None)) -> None:
    """Rejects a request (its resource's owners and admins may)."""
    client = Client(token)
    _decided(client(client.approval.RejectRequest, ap.RejectRequestRequest(id=request_id, comment=comment)))


def _decided(r: ap.ApprovalRequest) -> None:
    console.print(f"Request [bold]{r.id}[/bold]: {enum_name(ap.ApprovalStatus, r.status, 'APPROVAL_STATUS_')}.")


@approval_app.command("flow")
def approval_flow(setting: Optional[str] = typer.Argument(None, help="on or off (admins); none: show it."),
                  token: Optional[str] = typer.Option(None)) -> None:
    """Shows the approval flow, or turns it on or off: while it is on, changes to
    owned resources wait for an owner's approval."""
    client = Client(token)
    if setting is None:
        flow = client(client.approval.GetApprovalFlow, ap.GetApprovalFlowRequest())
    elif setting in ("on", "off"):
        flow = client(client.approval.UpdateApprovalFlow, ap.UpdateApprovalFlowRequest(enabled=setting == "on"))
    else:
        fail("the approval flow is `on` or `off`", code=2)
    if wants_json():
        emit(flow, lambda: None)
        return
    who = f" (set by {flow.updated_by})" if flow.updated_by else ""
    console.print(f"The approval flow is [bold]{'on' if flow.enabled else 'off'}[/bold]{who}.")
