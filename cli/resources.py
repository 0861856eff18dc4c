"""`ik resource …`: list, show, tree, logs, dry-run, update through a
reviewed temporary state, destroy, recreate, delete."""
from __future__ import annotations

import json
import time
from typing import Optional

import typer
from google.protobuf import json_format
from rich.text import Text
from rich.tree import Tree

from cli.connection import Client, console, fail
from cli.output import emit, enum_name, table, value, wants_json
from infrakitchen.executor.v1 import executor_pb2 as ep
from infrakitchen.resource.v1 import resource_pb2 as rp

resource_app = typer.Typer(help="Inspect and change resources.", no_args_is_help=True)

STATES = {enum_name(rp.ResourceState, n, "RESOURCE_STATE_"): n for n in rp.ResourceState.values() if n}
UNFINISHED_DRY_RUN = (rp.DRY_RUN_STATUS_UNSPECIFIED, rp.DRY_RUN_STATUS_QUEUED, rp.DRY_RUN_STATUS_RUNNING)
STATUSES = {enum_name(rp.ResourceStatus, n, "RESOURCE_STATUS_"): n for n in rp.ResourceStatus.values() if n}


def _choice(value_: str, choices: dict[str, int], option: str) -> int:
    if not value_:
        return 0
    if value_ not in choices:
        fail(f"{option} must be one of {', '.join(choices)}", code=2)
    return choices[value_]


def all_templates(client: Client) -> list:
    from infrakitchen.blueprint.v1 import blueprint_pb2 as bp
    return client.collect(client.blueprint.ListTemplates, bp.ListTemplatesRequest(), "templates")


def find_template(client: Client, key_or_id: str, templates: list | None = None):
    """`templates`: the catalog's, when the caller has it already."""
    found = next((t for t in (templates or all_templates(client)) if key_or_id in (t.id, t.key)), None)
    if found is None:
        fail(f"No template with key or id {key_or_id!r}.")
    return found


@resource_app.command("list")
def resource_list(template: str = typer.Option("", help="Template key or id."),
                  state: str = typer.Option("", help=f"One of {', '.join(STATES)}."),
                  status: str = typer.Option("", help=f"One of {', '.join(STATUSES)}."),
                  label: str = typer.Option("", help="Carrying this label."),
                  workflow: str = typer.Option("", help="Created by this workflow."),
                  parent: str = typer.Option("", help="Children of this resource."),
                  newest: bool = typer.Option(False, "--newest", help="Newest first."),
                  limit: int = typer.Option(100, help="At most this many (0: all)."),
                  token: Optional[str] = typer.Option(None)) -> None:
    """Resources, oldest first (or --newest first), filtered."""
    client = Client(token)
    templates = all_templates(client) if template or not wants_json() else []  # once: filter and names
    request = rp.ListResourcesRequest(template_id=find_template(client, template, templates).id if template else "",
                                      state=_choice(state, STATES, "--state"),
                                      status=_choice(status, STATUSES, "--status"), label=label,
                                      workflow_id=workflow, parent_id=parent,
                                      order_by="create_time desc" if newest else "")
    found = client.collect(client.resource.ListResources, request, "resources", limit)

    def render():
        names = {t.id: t.name for t in templates}  # a deleted template: its id
        t = table("id", "name", "state", "status", "template", "labels")
        for r in found:
            t.add_row(r.id, r.name, enum_name(rp.ResourceState, r.state, "RESOURCE_STATE_"),
                      enum_name(rp.ResourceStatus, r.status, "RESOURCE_STATUS_"),
                      names.get(r.template_id, r.template_id), ", ".join(r.labels))
        return t
    emit(found, render)


@resource_app.command("show")
def resource_show(resource_id: str, token: Optional[str] = typer.Option(None)) -> None:
    """A resource: state, inputs, outputs (sensitive ones masked unless you are an admin), owners."""
    client = Client(token)
    r = client(client.resource.GetResource, rp.GetResourceRequest(id=resource_id))
    emit(r, lambda: _resource_table(r))


def _resource_table(r: rp.Resource):
    t = table("field", "value")
    t.add_row("id", r.id)
    t.add_row("name", r.name)
    t.add_row("state / status", f"{enum_name(rp.ResourceState, r.state, 'RESOURCE_STATE_')} / "
                                f"{enum_name(rp.ResourceStatus, r.status, 'RESOURCE_STATUS_')}")
    t.add_row("template / version", f"{r.template_id} / {r.source_code_version_id}")
    t.add_row("revision", str(r.revision))
    t.add_row("variables", json.dumps(json_format.MessageToDict(r.variables)))
    for o in r.outputs:
        t.add_row(f"output {o.name}", value(o.value) + (" (sensitive)" if o.sensitive else ""))
    t.add_row("parents", ", ".join(r.parent_ids))
    t.add_row("owners", ", ".join(r.owners))
    t.add_row("labels", ", ".join(r.labels))
    t.add_row("workflow / step", f"{r.workflow_id} / {r.step_id}" if r.workflow_id else "")
    t.add_row("last job", r.last_job_id)
    if r.error_message:
        t.add_row("error", Text(r.error_message, style="red"))
    if r.approval_request_id:
        t.add_row("waits for approval", r.approval_request_id)
    return t


@resource_app.command("tree")
def resource_tree(resource_id: str, token: Optional[str] = typer.Option(None)) -> None:
    """The resource's parents (nearest first) and its descendants."""
    client = Client(token)
    answer = client(client.resource.GetResourceTree, rp.GetResourceTreeRequest(id=resource_id))

    def render():
        root = Tree(Text("parents: " + (" <- ".join(f"{p.name} ({p.id})" for p in answer.parents) or "none"),
                         style="dim"))

        def add(node, branch):
            state = enum_name(rp.ResourceState, node.state, "RESOURCE_STATE_")
            child = branch.add(Text.assemble((node.name, "bold"), f"  {node.id}  ", (state, "dim")))
            for c in node.children:
                add(c, child)
        add(answer.root, root)
        return root
    emit(answer, render)


@resource_app.command("logs")
def resource_logs(resource_id: str, follow: bool = typer.Option(False, "--follow", "-f"),
                  token: Optional[str] = typer.Option(None)) -> None:
    """Log lines of the resource's latest job (with --follow: until it ends,
    reconnecting after the last line seen if the executor restarts)."""
    client = Client(token)
    r = client(client.resource.GetResource, rp.GetResourceRequest(id=resource_id))
    if not r.last_job_id:
        console.print("This resource has run no job yet.")
        return
    follow_job_logs(client, r.last_job_id, follow)


def follow_job_logs(client: Client, job_id: str, follow: bool) -> None:
    seen = {"last": 0}

    def open_stream():
        stream = client.executor.StreamJobLogs(ep.StreamJobLogsRequest(job_id=job_id, after_line=seen["last"]),
                                               metadata=client.md, timeout=None if follow else 30)
        for chunk in stream:
            yield chunk
            if not follow:
                stream.cancel()
                return

    def on_chunk(chunk):
        for line in chunk.lines:
            seen["last"] = max(seen["last"], line.number)
            style = {"stderr": "red", "executor": "cyan"}.get(line.stream, "")
            console.print(Text(line.text, style=style), soft_wrap=True)

    client.stream(open_stream, resume=lambda: None, on_item=on_chunk, service="executor", wait=120)


@resource_app.command("create")
def resource_create(template: str = typer.Option(..., help="Template key or id."),
                    name: str = typer.Option(...),
                    var: list[str] = typer.Option([], "--var", help="<variable>=<value> (JSON or text)."),
                    version: str = typer.Option("", help="Source code version id (default: the template's)."),
                    parent: list[str] = typer.Option([], "--parent", help="A parent resource id."),
                    integration: list[str] = typer.Option([], "--integration", help="An integration id."),
                    secret: list[str] = typer.Option([], "--secret", help="A secret id."),
                    storage: str = typer.Option("", help="Storage id for its state."),
                    label: list[str] = typer.Option([], "--label"),
                    provision: bool = typer.Option(False, help="Provision it right away."),
                    token: Optional[str] = typer.Option(None)) -> None:
    """Creates a resource from a template (and provisions it with --provision)."""
    client = Client(token)
    found = find_template(client, template)
    resource = rp.Resource(name=name, template_id=found.id, source_code_version_id=version, parent_ids=parent,
                           integration_ids=integration, secret_ids=secret, storage_id=storage, labels=label)
    resource.variables.update(parse_values(var))
    r = client(client.resource.CreateResource, rp.CreateResourceRequest(resource=resource, provision=provision))
    console.print(f"Resource [bold]{r.id}[/bold] ({r.name}) "
                  f"{enum_name(rp.ResourceState, r.state, 'RESOURCE_STATE_')}.")


def parse_values(pairs: list[str]) -> dict:
    """`name=value` pairs; a value is JSON when it parses, else text."""
    values = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name:
            fail(f"--var {pair!r}: expected <variable>=<value>", code=2)
        try:
            values[name] = json.loads(raw)
        except json.JSONDecodeError:
            values[name] = raw
    return values


@resource_app.command("dry-run")
def resource_dry_run(resource_id: str, token: Optional[str] = typer.Option(None)) -> None:
    """Plans the resource as it stands (nothing is applied); follow with `ik resource logs`."""
    client = Client(token)
    r = client(client.resource.DryRunResource, rp.DryRunResourceRequest(id=resource_id))
    console.print(f"Dry run of [bold]{r.id}[/bold] started (job {r.last_dry_run.job_id or r.last_job_id}).")


@resource_app.command("update")
def resource_update(resource_id: str,
                    var: list[str] = typer.Option([], "--var", help="<variable>=<value> (JSON or text)."),
                    version: str = typer.Option("", help="Move to this source code version."),
                    description: str = typer.Option("", help="Why (shown to approvers)."),
                    submit: bool = typer.Option(False, help="Apply it once its dry run is done (the approval "
                                                            "flow may make it wait for an owner)."),
                    token: Optional[str] = typer.Option(None)) -> None:
    """Proposes new inputs for a provisioned resource as a temporary state,
    dry-runs it and shows the difference; --submit applies it."""
    client = Client(token)
    current = client(client.resource.GetResource, rp.GetResourceRequest(id=resource_id))
    proposal = rp.TemporaryState(resource_id=resource_id)
    if description:
        proposal.description = description
    if version:
        proposal.source_code_version_id = version
    proposed = parse_values(var)
    proposal.variables.update(proposed)
    ts = client(client.resource.CreateTemporaryState, rp.CreateTemporaryStateRequest(temporary_state=proposal))
    before = json_format.MessageToDict(current.variables)
    t = table("input", "now", "proposed")
    for name, new in proposed.items():
        t.add_row(name, json.dumps(before.get(name)), json.dumps(new))
    if version:
        t.add_row("source code version", current.source_code_version_id, version)
    console.print(t)
    ts = client(client.resource.DryRunTemporaryState, rp.DryRunTemporaryStateRequest(id=ts.id))
    with console.status("dry run"):
        while ts.dry_run.status in UNFINISHED_DRY_RUN:
            time.sleep(0.5)
            ts = client(client.resource.GetTemporaryState, rp.GetTemporaryStateRequest(id=ts.id))
    console.print(f"Temporary state [bold]{ts.id}[/bold]: plan +{ts.plan_add} ~{ts.plan_change} -{ts.plan_destroy}"
                  + (f" ({ts.dry_run.error_message})" if ts.dry_run.error_message else ""))
    if submit:
        ts = client(client.resource.SubmitTemporaryState, rp.SubmitTemporaryStateRequest(id=ts.id, etag=ts.etag))
        console.print("Submitted" + (f"; it waits for approval {ts.approval_request_id}."
                                     if ts.approval_request_id else "."))
    else:
        console.print(f"Apply it with: ik resource submit {ts.id}", highlight=False)


@resource_app.command("submit")
def resource_submit(temporary_state_id: str, token: Optional[str] = typer.Option(None)) -> None:
    """Applies a dry-run temporary state (the approval flow may make it wait for an owner)."""
    client = Client(token)
    ts = client(client.resource.GetTemporaryState, rp.GetTemporaryStateRequest(id=temporary_state_id))
    ts = client(client.resource.SubmitTemporaryState, rp.SubmitTemporaryStateRequest(id=ts.id, etag=ts.etag))
    console.print("Submitted" + (f"; it waits for approval {ts.approval_request_id}." if ts.approval_request_id
                                 else "."))


@resource_app.command("destroy")
def resource_destroy(resource_id: str, yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask."),
                     token: Optional[str] = typer.Option(None)) -> None:
    """Destroys the resource's infrastructure (terraform destroy). Refused, with
    the list of its dependents, while other resources depend on it."""
    client = Client(token)
    r = client(client.resource.GetResource, rp.GetResourceRequest(id=resource_id))
    if not yes and not typer.confirm(f"Destroy {r.name} ({r.id})?", default=False):
        fail("Nothing destroyed.")
    r = client(client.resource.DestroyResource, rp.DestroyResourceRequest(id=r.id, etag=r.etag))
    console.print(f"Destroy of [bold]{r.id}[/bold] started" + (f"; it waits for approval {r.approval_request_id}."
                                                               if r.approval_request_id else "."))


@resource_app.command("recreate")
def resource_recreate(resource_id: str, token: Optional[str] = typer.Option(None)) -> None:
    """Destroys and applies the resource again."""
    client = Client(token)
    r = client(client.resource.GetResource, rp.GetResourceRequest(id=resource_id))
    r = client(client.resource.RecreateResource, rp.RecreateResourceRequest(id=r.id, etag=r.etag))
    console.print(f"Recreate of [bold]{r.id}[/bold] started.")


@resource_app.command("delete")
def resource_delete(resource_id: str, yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask."),
                    token: Optional[str] = typer.Option(None)) -> None:
    """Deletes the record of a destroyed resource."""
    client = Client(token)
    r = client(client.resource.GetResource, rp.GetResourceRequest(id=resource_id))
    if not yes and not typer.confirm(f"Delete the record of {r.name} ({r.id})?", default=False):
        fail("Nothing deleted.")
    client(client.resource.DeleteResource, rp.DeleteResourceRequest(id=r.id, etag=r.etag))
    console.print(f"Deleted [bold]{r.id}[/bold].")
