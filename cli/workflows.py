"""`ik workflow …`: create and run workflows from blueprints, follow them
live, plan, fix and resume, cancel, tear down."""
from __future__ import annotations

import datetime as dt
import json
import time
from typing import Optional

import typer
from google.protobuf import json_format
from rich.live import Live
from rich.text import Text
from rich.tree import Tree

from cli.connection import Client, console, err_console, fail
from cli.output import emit, table, wants_json
from infrakitchen.blueprint.v1 import blueprint_pb2 as bp
from infrakitchen.executor.v1 import executor_pb2 as ep
from infrakitchen.workflow.v1 import workflow_pb2 as wp

workflow_app = typer.Typer(help="Create, run and inspect workflows.", no_args_is_help=True)

STEP_STYLE = {wp.STEP_STATUS_PENDING: ("○", "dim"), wp.STEP_STATUS_IN_PROGRESS: ("◐", "yellow"),
              wp.STEP_STATUS_DONE: ("●", "green"), wp.STEP_STATUS_ERROR: ("✗", "red")}
WORKFLOW_STYLE = {wp.WORKFLOW_STATUS_PENDING: "dim", wp.WORKFLOW_STATUS_IN_PROGRESS: "yellow",
                  wp.WORKFLOW_STATUS_DONE: "green", wp.WORKFLOW_STATUS_ERROR: "red"}


def _parse_vars(pairs: list[str], keys: dict[str, str]) -> list[wp.TemplateVariables]:
    per_template: dict[str, dict] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        template, dot, variable = name.partition(".")
        if not sep or not dot or template not in keys:
            fail(f"--var {pair!r}: expected <template key>.<variable>=<value>, "
                 f"template one of {', '.join(sorted(keys))}", code=2)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        per_template.setdefault(keys[template], {})[variable] = value
    out = []
    for template_id, values in per_template.items():
        tv = wp.TemplateVariables(template_id=template_id)
        tv.variables.update(values)
        out.append(tv)
    return out


def find_blueprint(client: Client, name_or_id: str) -> bp.Blueprint:
    for b in all_blueprints(client):
        if name_or_id in (b.id, b.name):
            return b
    fail(f"No blueprint named or with id {name_or_id!r}.")


def all_blueprints(client: Client) -> list[bp.Blueprint]:
    return client.collect(client.blueprint.ListBlueprints, bp.ListBlueprintsRequest(), "blueprints")


def _created(client: Client, blueprint: str, var: list[str], integration: list[str], secret: list[str],
             storage: str, max_parallel: int, on_failure: str, retries: int, ttl: str) -> tuple[wp.Workflow, str]:
    """A new workflow of the blueprint (not executed), and the blueprint's name."""
    b = find_blueprint(client, blueprint)
    keys = {}
    for t in b.templates:
        template = client(client.blueprint.GetTemplate, bp.GetTemplateRequest(id=t.template_id))
        keys[template.key] = template.id
    if not integration:
        found = client(client.executor.ListIntegrations, ep.ListIntegrationsRequest(page_size=1000))
        integration = [i.id for i in found.integrations if i.name == "example"]
    if not storage:
        found = client(client.executor.ListStorages, ep.ListStoragesRequest(page_size=1000))
        storage = next((s.id for s in found.storages if s.name == "example-local"), "")
    policies = {"stop": wp.FAILURE_POLICY_STOP, "continue-independent": wp.FAILURE_POLICY_CONTINUE_INDEPENDENT}
    if on_failure not in policies:
        fail(f"--on-failure must be one of {', '.join(policies)}", code=2)
    request = wp.CreateWorkflowRequest(
        blueprint_id=b.id, variable_overrides=_parse_vars(var, keys), integration_ids=integration,
        secret_ids=secret, storage_id=storage, max_parallel_steps=max_parallel, on_failure=policies[on_failure])
    if retries:
        request.retry_policy.max_attempts = retries + 1
    if ttl:
        request.ttl.FromSeconds(_duration_seconds(ttl))
    return client(client.workflow.CreateWorkflow, request), b.name


# The options `run` and `create` share.
_BLUEPRINT = typer.Argument(..., help="Blueprint name or id.")
_VAR = typer.Option([], "--var", help="<template key>.<variable>=<value> (JSON or text).")
_INTEGRATION = typer.Option([], help="Integration ids (default: the one named example).")
_SECRET = typer.Option([], help="Secret ids shared by all steps.")
_STORAGE = typer.Option("", help="Storage id (default: the one named example-local).")
_MAX_PARALLEL = typer.Option(0, help="At most this many steps at once (0: no limit).")
_ON_FAILURE = typer.Option("stop", "--on-failure", help="stop, or continue-independent: steps that do not depend "
                                                          "on a failed one keep starting.")
_RETRIES = typer.Option(0, "--retries", help="Retries of a step's transient failure (rate limits, timeouts, lock "
                                             "contention...).")
_TTL = typer.Option("", "--ttl", help="Tear the workflow down by itself after this long, e.g. 90m, 8h, 7d.")


@workflow_app.command("run")
def workflow_run(blueprint: str = _BLUEPRINT, var: list[str] = _VAR, integration: list[str] = _INTEGRATION,
                 secret: list[str] = _SECRET, storage: str = _STORAGE, max_parallel: int = _MAX_PARALLEL,
                 on_failure: str = _ON_FAILURE, retries: int = _RETRIES, ttl: str = _TTL,
                 watch: bool = typer.Option(True, help="Follow the steps live until the workflow ends."),
                 token: Optional[str] = typer.Option(None)) -> None:
    """Creates a workflow from a blueprint and executes it."""
    client = Client(token)
    w, name = _created(client, blueprint, var, integration, secret, storage, max_parallel, on_failure, retries, ttl)
    w = client(client.workflow.ExecuteWorkflow, wp.ExecuteWorkflowRequest(id=w.id))
    console.print(f"Workflow [bold]{w.id}[/bold] of {name} started.")
    if watch:
        w = _watch(client, w.id, w)
        raise typer.Exit(0 if w.status == wp.WORKFLOW_STATUS_DONE else 1)


@workflow_app.command("create")
def workflow_create(blueprint: str = _BLUEPRINT, var: list[str] = _VAR, integration: list[str] = _INTEGRATION,
                    secret: list[str] = _SECRET, storage: str = _STORAGE, max_parallel: int = _MAX_PARALLEL,
                    on_failure: str = _ON_FAILURE, retries: int = _RETRIES, ttl: str = _TTL,
                    token: Optional[str] = typer.Option(None)) -> None:
    """Creates a workflow from a blueprint without executing it: plan it first
    (`ik workflow plan`), then `ik workflow execute` (with --plan)."""
    client = Client(token)
    w, name = _created(client, blueprint, var, integration, secret, storage, max_parallel, on_failure, retries, ttl)
    if wants_json():
        emit(w, lambda: None)
        return
    console.print(f"Workflow [bold]{w.id}[/bold] of {name} created (pending): `ik workflow plan {w.id}`, then "
                  f"`ik workflow execute {w.id}`.")


@workflow_app.command("watch")
def workflow_watch(workflow_id: str, token: Optional[str] = typer.Option(None)) -> None:
    """Follows a workflow's steps live until it ends (again, after Ctrl-C);
    exits 0 when it is done, 1 otherwise."""
    client = Client(token)
    w = client(client.workflow.GetWorkflow, wp.GetWorkflowRequest(id=workflow_id))
    if _settled(w):  # nothing moves: show it as it is
        console.print(_tree(w))
    else:
        w = _watch(client, w.id, w)
    raise typer.Exit(0 if w.status == wp.WORKFLOW_STATUS_DONE else 1)


def _duration_seconds(text: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = text[:-1], text[-1:]
    if unit not in units or not number.isdigit():
        fail(f"{text!r}: expected a number and a unit (s, m, h or d), e.g. 8h", code=2)
    return int(number) * units[unit]


@workflow_app.command("cancel")
def workflow_cancel(workflow_id: str, watch: bool = typer.Option(True, help="Follow it until it has stopped."),
                    token: Optional[str] = typer.Option(None)) -> None:
    """Cancels a running workflow: running jobs are interrupted, nothing new starts; execute it again later."""
    client = Client(token)
    w = client(client.workflow.CancelWorkflow, wp.CancelWorkflowRequest(id=workflow_id))
    console.print(f"Workflow [bold]{w.id}[/bold] is being cancelled by {w.cancelled_by}.")
    if watch:
        w = _watch(client, w.id, w)
        console.print(f"It ended {wp.WorkflowStatus.Name(w.status).removeprefix('WORKFLOW_STATUS_').lower()}: "
                      f"{w.error_message}")


@workflow_app.command("update")
def workflow_update(workflow_id: str,
                    var: list[str] = typer.Option([], "--var", help="<template key>.<variable>=<value> (JSON or "
                                                                    "text); merged into that template's overrides."),
                    version: list[str] = typer.Option([], "--version",
                                                      help="<template key>=<source code version id>."),
                    execute: bool = typer.Option(False, "--execute", help="Re-execute afterwards and follow it."),
                    token: Optional[str] = typer.Option(None)) -> None:
    """Fixes the inputs of a pending or failed workflow (steps already done
    keep their resources), then optionally re-executes it."""
    client = Client(token)
    w = client(client.workflow.GetWorkflow, wp.GetWorkflowRequest(id=workflow_id))
    keys = {}
    for template_id in {s.template_id for s in w.steps} | {o.template_id for o in w.parent_overrides}:
        keys[client(client.blueprint.GetTemplate, bp.GetTemplateRequest(id=template_id)).key] = template_id
    update = wp.Workflow(id=w.id, etag=w.etag)
    mask = []
    if var:
        current = {o.template_id: o for o in w.variable_overrides}
        for tv in _parse_vars(var, keys):
            merged = wp.TemplateVariables(template_id=tv.template_id)
            if tv.template_id in current:  # masked values sent back keep what the server has
                merged.variables.MergeFrom(current[tv.template_id].variables)
            merged.variables.update(json_format.MessageToDict(tv.variables))
            update.variable_overrides.append(merged)
        mask.append("variable_overrides")
    for pair in version:
        key, sep, version_id = pair.partition("=")
        if not sep or key not in keys:
            console.print(f"[red]--version {pair!r}: expected <template key>=<version id>, template one of "
                          f"{', '.join(sorted(keys))}")
            raise typer.Exit(2)
        update.source_code_version_overrides.add(template_id=keys[key], source_code_version_id=version_id)
    if version:
        mask.append("source_code_version_overrides")
    if not mask:
        console.print("[red]Nothing to change: give --var or --version.")
        raise typer.Exit(2)
    w = client(client.workflow.UpdateWorkflow, wp.UpdateWorkflowRequest(workflow=update, update_mask=mask))
    console.print(f"Workflow [bold]{w.id}[/bold] updated.")
    if execute:
        _execute(client, w.id, watch=True)
    console.print(_tree(w, details=True))


@workflow_app.command("execute")
def workflow_execute(workflow_id: str, watch: bool = typer.Option(True, help="Follow the steps live."),
                     plan: str = typer.Option("", "--plan", help="Apply this plan (its id, as `ik workflow plan` "
                                                                  "prints it): each step applies its saved plan."),
                     token: Optional[str] = typer.Option(None)) -> None:
    """Executes a pending workflow, or one in error again (done steps are skipped)."""
    _execute(Client(token), workflow_id, watch, plan)


def _execute(client: Client, workflow_id: str, watch: bool, plan_id: str = "") -> None:
    w = client(client.workflow.ExecuteWorkflow, wp.ExecuteWorkflowRequest(id=workflow_id, plan_id=plan_id))
    console.print(f"Workflow [bold]{w.id}[/bold] started" + (f", applying plan {plan_id}." if plan_id else "."))
    if w.plan_approval_status == "pending":
        console.print(f"The plan waits for approval: request [bold]{w.plan_approval_request_id}[/bold].")
    if watch:
        w = _watch(client, w.id, w)
        raise typer.Exit(0 if w.status == wp.WORKFLOW_STATUS_DONE else 1)


@workflow_app.command("plan")
def workflow_plan(workflow_id: str, token: Optional[str] = typer.Option(None)) -> None:
    """Plans every step that is not done, before anything is applied: a table
    of each step's changes, or the inputs a deferred step waits for."""
    client = Client(token)
    w = client(client.workflow.PlanWorkflow, wp.PlanWorkflowRequest(id=workflow_id))
    with console.status("planning"):
        while w.plan_status == wp.PLAN_STATUS_IN_PROGRESS:
            time.sleep(0.5)
            w = client(client.workflow.GetWorkflow, wp.GetWorkflowRequest(id=workflow_id))
    if wants_json():
        emit(w, lambda: None)
        raise typer.Exit(1 if w.plan_status == wp.PLAN_STATUS_ERROR else 0)
    names = {s.id: s.template_name for s in w.steps}
    t = table("step", "plan", "+", "~", "-", "changes / waits for")
    for s in sorted(w.steps, key=lambda s: (s.position, s.template_name)):
        status = wp.StepPlanStatus.Name(s.plan.status).removeprefix("STEP_PLAN_STATUS_").lower() \
            if s.HasField("plan") else "done before"
        if s.plan.status == wp.STEP_PLAN_STATUS_DEFERRED:
            detail = ", ".join(f"{d.variable} <- {names.get(d.source_step_id, d.source_template_id)}."
                               f"{d.source_output}" for d in s.plan.deferred_inputs)
        elif s.plan.status == wp.STEP_PLAN_STATUS_ERROR:
            detail = Text(s.plan.error_message, style="red")
        else:
            detail = ", ".join(f"{c.action} {c.address}" for c in s.plan.changes)
        counts = [str(n) for n in (s.plan.add, s.plan.change, s.plan.destroy)] \
            if s.plan.status == wp.STEP_PLAN_STATUS_PLANNED else ["", "", ""]
        t.add_row(s.template_name, status, *counts, detail)
    console.print(t)
    if w.plan_status == wp.PLAN_STATUS_ERROR:
        console.print(f"[red]The plan failed: {w.plan_error_message}")
        raise typer.Exit(1)
    console.print(f"Plan [bold]{w.plan_id}[/bold]. To apply exactly this plan:")
    console.print(f"  ik workflow execute {w.id} --plan {w.plan_id}", soft_wrap=True, highlight=False)


@workflow_app.command("show")
def workflow_show(workflow_id: str, token: Optional[str] = typer.Option(None)) -> None:
    """The workflow's steps, statuses, resources and resolved variables."""
    client = Client(token)
    w = client(client.workflow.GetWorkflow, wp.GetWorkflowRequest(id=workflow_id))
    emit(w, lambda: _tree(w, details=True))


@workflow_app.command("list")
def workflow_list(limit: int = typer.Option(50, help="Show the newest this many (0: all)."),
                  token: Optional[str] = typer.Option(None)) -> None:
    """Workflows, newest first, with their blueprint's name."""
    client = Client(token)
    workflows = client.collect(client.workflow.ListWorkflows, wp.ListWorkflowsRequest(order_by="create_time desc"),
                               "workflows", limit)

    def render():
        names = {b.id: b.name for b in all_blueprints(client)}
        t = table("id", "blueprint", "status", "steps", "created")
        for w in workflows:
            t.add_row(w.id, names.get(w.blueprint_id, w.blueprint_id), _status_text(w), str(len(w.steps)),
                      w.create_time.ToDatetime().isoformat(timespec="seconds"))
        return t
    emit(workflows, render)


@workflow_app.command("teardown")
def workflow_teardown(workflow_id: str,
                      preview: bool = typer.Option(False, "--preview", help="Only show what would be destroyed."),
                      yes: bool = typer.Option(False, "--yes", "-y", help="Destroy without asking."),
                      watch: bool = typer.Option(True, help="Follow the destroys live until the teardown ends."),
                      token: Optional[str] = typer.Option(None)) -> None:
    """Destroys the workflow's resources, dependents first (needs an admin
    token). Shows what it will destroy and asks first, unless --yes."""
    client = Client(token)
    plan = client(client.workflow.PreviewWorkflowTeardown, wp.PreviewWorkflowTeardownRequest(id=workflow_id))
    # A server too old to say (no field) leaves it to TeardownWorkflow's own check.
    refused = plan.HasField("caller_can_teardown") and not plan.caller_can_teardown
    if not preview and plan.steps and refused:
        # Said before the table and the question, not after a confirmation.
        fail(f"Tearing down needs the admin role, which your token does not have. "
             f"`ik workflow teardown {workflow_id} --preview` shows what it would destroy.")
    # Every resource a step waits for is one of this teardown's: named by its step.
    step_of = {s.resource_id: s.template_name for s in plan.steps}

    def render():
        t = table("order", "step", "resource", "after", "outside dependents")
        for s in plan.steps:
            t.add_row(str(s.level), s.template_name, s.resource_id,
                      ", ".join(step_of.get(r, r) for r in s.blocked_by_resource_ids),
                      Text(", ".join(s.external_dependent_resource_ids), style="red"))
        return t if plan.steps else "Nothing left to destroy."
    if preview:
        emit(plan, render)
        if not wants_json() and refused:
            console.print("Tearing it down needs the admin role, which your token does not have.")
        return
    console.print(render())
    if plan.steps and not yes and not typer.confirm(f"Destroy these {len(plan.steps)} resources?", default=False):
        fail("Nothing destroyed.")
    w = client(client.workflow.TeardownWorkflow, wp.TeardownWorkflowRequest(id=workflow_id))
    console.print(f"Teardown of workflow [bold]{w.id}[/bold] started.")
    if watch:
        w = _watch(client, w.id, w)
        raise typer.Exit(0 if w.teardown_status == wp.TEARDOWN_STATUS_DONE else 1)


# --- rendering ------------------------------------------------------------------------

def _elapsed(step: wp.Step) -> str:
    if not step.start_time.seconds:
        return ""
    start = step.start_time.ToDatetime()
    end = step.completion_time.ToDatetime() if step.completion_time.seconds else dt.datetime.utcnow()
    return f"{(end - start).total_seconds():.1f}s"


def _tree(w: wp.Workflow, details: bool = False) -> Tree:
    status = wp.WorkflowStatus.Name(w.status).removeprefix("WORKFLOW_STATUS_").lower()
    root = Tree(Text.assemble(("workflow ", "bold"), (w.id, ""), ("  " + status, WORKFLOW_STYLE[w.status])))
    if w.error_message:
        root.add(Text(w.error_message, style="red"))
    if w.teardown_status:
        teardown = wp.TeardownStatus.Name(w.teardown_status).removeprefix("TEARDOWN_STATUS_").lower()
        root.add(Text(f"teardown {teardown}", style="bold"))
        if w.teardown_error_message:
            root.add(Text(w.teardown_error_message, style="red"))
    for position in sorted({s.position for s in w.steps}):
        level = root.add(Text(f"position {position}", style="bold"))
        for s in sorted((s for s in w.steps if s.position == position), key=lambda s: s.template_name):
            mark, style = STEP_STYLE[s.status]
            name = wp.StepStatus.Name(s.status).removeprefix("STEP_STATUS_").lower()
            line = Text.assemble((f"{mark} ", style), (f"{s.template_name:<16}", "bold"), (f"{name:<12}", style),
                                 (f"{_elapsed(s):>8}", "dim"))
            if s.resource_id:
                line.append(f"  resource {s.resource_id}", style="dim")
            node = level.add(line)
            if s.waiting_reason:
                node.add(Text(s.waiting_reason, style="yellow"))
            if s.error_message:
                node.add(Text(s.error_message, style="red"))
            if s.teardown_status:
                teardown = wp.TeardownStatus.Name(s.teardown_status).removeprefix("TEARDOWN_STATUS_").lower()
                node.add(Text(f"destroy {teardown}" + (f": {s.teardown_error_message}"
                                                       if s.teardown_error_message else ""),
                              style="red" if s.teardown_error_message else "dim"))
            if details and s.resolved_variables:
                # As JSON (a list is a list, not protobuf text).
                node.add(Text(json.dumps(json_format.MessageToDict(s.resolved_variables), separators=(", ", ": ")),
                              style="dim"))
    return root


TEARDOWN_TEXT = {wp.TEARDOWN_STATUS_IN_PROGRESS: "tearing down", wp.TEARDOWN_STATUS_DONE: "torn down",
                 wp.TEARDOWN_STATUS_ERROR: "teardown failed"}


def _status_text(w: wp.Workflow) -> str:
    """The workflow's status, and its teardown's when there is one: a destroyed
    workflow does not look like a live one."""
    status = wp.WorkflowStatus.Name(w.status).removeprefix("WORKFLOW_STATUS_").lower()
    teardown = TEARDOWN_TEXT.get(w.teardown_status)
    return f"{status}, {teardown}" if teardown else status


def _settled(w: wp.Workflow | None) -> bool:
    return w is not None and w.status != wp.WORKFLOW_STATUS_IN_PROGRESS and \
        w.teardown_status != wp.TEARDOWN_STATUS_IN_PROGRESS


def _watch(client: Client, workflow_id: str, current: wp.Workflow | None = None) -> wp.Workflow:
    """Follows the workflow live until it settles: the tree is drawn again
    twice a second (elapsed times tick between changes), and a restart of the
    workflow service only pauses it: the stream is opened again (its first
    message is the workflow as it is), whether it broke (UNAVAILABLE) or the
    stopping service closed it."""
    state = {"last": current}

    def on_change(change):
        state["last"] = change.workflow

    def render():
        return _tree(state["last"]) if state["last"] is not None else Text("connecting…", style="dim")

    with Live(get_renderable=render, console=console, refresh_per_second=2):
        while True:
            client.stream(lambda: client.workflow.WatchWorkflow(wp.WatchWorkflowRequest(id=workflow_id),
                                                                metadata=client.md),
                          resume=lambda: None, on_item=on_change, service="workflow", wait=120)
            if _settled(state["last"]):
                return state["last"]
            err_console.print("[dim]the workflow service closed the stream; reconnecting…[/dim]")
            time.sleep(0.5)
