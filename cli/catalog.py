"""`ik blueprint …`: the blueprints users run (list, show, preview)."""
from __future__ import annotations

from typing import Optional

import typer
from rich.text import Text
from rich.tree import Tree

from cli.connection import Client, console
from cli.output import emit, enum_name, table
from cli.workflows import all_blueprints, find_blueprint
from infrakitchen.blueprint.v1 import blueprint_pb2 as bp

blueprint_app = typer.Typer(help="List, show and preview blueprints.", no_args_is_help=True)


@blueprint_app.command("list")
def blueprint_list(token: Optional[str] = typer.Option(None)) -> None:
    """Every blueprint, with its templates."""
    client = Client(token)
    found = all_blueprints(client)

    def render():
        t = table("id", "name", "templates", "wiring rules", "description")
        for b in found:
            t.add_row(b.id, b.name, str(len(b.templates)), str(len(b.wiring_rules)), b.description)
        return t
    emit(found, render)


@blueprint_app.command("show")
def blueprint_show(blueprint: str = typer.Argument(..., help="Name or id."),
                   token: Optional[str] = typer.Option(None)) -> None:
    """A blueprint's templates and wiring rules."""
    client = Client(token)
    b = find_blueprint(client, blueprint)

    def render():
        names = {t.template_id: client(client.blueprint.GetTemplate, bp.GetTemplateRequest(id=t.template_id)).name
                 for t in b.templates}
        root = Tree(Text.assemble(("blueprint ", "bold"), b.name, ("  " + b.id, "dim")))
        templates = root.add(Text("templates", style="bold"))
        for t in b.templates:
            templates.add(f"{names[t.template_id]} ({t.template_id}), version {t.source_code_version_id}")
        wiring = root.add(Text("wiring", style="bold"))
        for w in b.wiring_rules:
            wiring.add(f"{names.get(w.source_template_id, w.source_template_id)}.{w.source_output} -> "
                       f"{names.get(w.target_template_id, w.target_template_id)}.{w.target_variable}")
        return root
    emit(b, render)


@blueprint_app.command("preview")
def blueprint_preview(blueprint: str = typer.Argument(..., help="Name or id."),
                      token: Optional[str] = typer.Option(None)) -> None:
    """The steps a workflow of this blueprint would run, in order, and where each variable comes from."""
    client = Client(token)
    b = find_blueprint(client, blueprint)
    preview = client(client.blueprint.PreviewBlueprint, bp.PreviewBlueprintRequest(id=b.id))

    def render():
        t = table("position", "step", "depends on", "variables")
        names = {s.template_id: s.template_name for s in preview.steps}
        for s in sorted(preview.steps, key=lambda s: (s.position, s.template_name)):
            variables = ", ".join(f"{v.name} <- {enum_name(bp.VariableOrigin, v.origin, 'VARIABLE_ORIGIN_')}"
                                  + (f" {names.get(v.source_template_id, v.source_template_id)}.{v.source_output}"
                                     if v.source_output else "") for v in s.variables)
            t.add_row(str(s.position), s.template_name, ", ".join(names.get(d, d) for d in s.depends_on_template_ids),
                      variables)
        for w in preview.warnings:
            console.print(Text(f"warning: {names.get(w.template_id, w.template_id)}.{w.variable}: {w.message}",
                               style="yellow"))
        return t
    emit(preview, render)
