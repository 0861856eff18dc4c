"""The `ik` command line: the tool an operator keeps open all day. Blueprints,
workflows (run, watch, plan, fix and resume, cancel, tear down), resources,
approvals, and what jobs run with (integrations, secrets, storages).

Where the services are and who you are: cli/connection.py (`--server`,
IK_SERVER or the server saved by `ik login`; IK_<SVC>_TARGET / IK_<SVC>_PORT
as the services read them; the token from --token, IK_TOKEN or `ik login`).
Read commands print tables and trees, or JSON with `-o json`."""
from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path
from typing import Optional

import typer

from cli.admin import integration_app, secret_app, storage_app
from cli.approvals import approval_app
from cli.catalog import blueprint_app
from cli.connection import Client, config_dir, console, err_console, fail, options, save_config
from cli.resources import resource_app
from cli.workflows import workflow_app
from infrakitchen.executor.v1 import executor_pb2 as ep

app = typer.Typer(help="InfraKitchen: run blueprints as workflows and follow them.", no_args_is_help=True)
example_app = typer.Typer(help="The seed's Production Environment example.", no_args_is_help=True)
app.add_typer(blueprint_app, name="blueprint")
app.add_typer(workflow_app, name="workflow")
app.add_typer(resource_app, name="resource")
app.add_typer(approval_app, name="approval")
app.add_typer(integration_app, name="integration")
app.add_typer(secret_app, name="secret")
app.add_typer(storage_app, name="storage")
app.add_typer(example_app, name="example")


def version() -> str:
    try:
        return metadata.version("infrakitchen")
    except metadata.PackageNotFoundError:  # run from a checkout: the project's own version
        import tomllib
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        return tomllib.loads(pyproject.read_text())["project"]["version"]


def _show_version(value: bool) -> None:
    if value:
        console.print(f"ik {version()}", highlight=False)
        raise typer.Exit(0)


@app.callback()
def main(server: str = typer.Option("", "--server", "-s", envvar="IK_SERVER",
                                    help="Host of the services (each on its port); default: the one `ik login` "
                                         "saved, else 127.0.0.1."),
         output: str = typer.Option("text", "--output", "-o", help="text, or json for scripts (read commands)."),
         token: str = typer.Option("", "--token", envvar="IK_TOKEN", help="Bearer token (default: `ik login`'s)."),
         show_version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                           help="Print the version and exit.")) -> None:
    if output not in ("text", "json"):
        fail("--output must be text or json", code=2)
    options.server, options.output, options.token = server, output, token
    # The width a caller asks for (COLUMNS) holds for this command, whenever the consoles were made.
    if (columns := os.environ.get("COLUMNS", "")).isdigit():
        console.width = err_console.width = int(columns)


@app.command()
def login(token: str = typer.Option(..., help="A bearer token (`make token` prints an admin one)."),
          server: str = typer.Option("", help="Also remember this server (host) for the next commands.")) -> None:
    """Saves the token (and the server) for the next commands, in the config directory."""
    directory = config_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "token"
    path.write_text(token)
    path.chmod(0o600)
    console.print(f"Saved the token in {path}.")
    if server:
        console.print(f"Saved the server {server} in {save_config(server=server)}.")


@example_app.command("register")
def example_register(repo: Path = typer.Option(None, help="Where to publish the example modules as git."),
                     state_dir: str = typer.Option(
                         None, help="Where the executor keeps the example's state: a directory it can write, "
                                    "as the executor sees it (in a container, under its /data volume). "
                                    "Default: example-state in IK_DATA_DIR."),
                     token: Optional[str] = typer.Option(None)) -> None:
    """Publishes examples/modules to git and registers the Production Environment
    blueprint, plus an example integration and local state storage. Running it
    again changes nothing."""
    from examples.production_environment import publish_modules, register
    client = Client(token)
    data_dir = Path(os.environ.get("IK_DATA_DIR", ".data")).resolve()
    url = publish_modules(repo or data_dir / "example-modules")
    example = register(client.channel("blueprint"), client.md, url)
    client(client.executor.CreateIntegration, ep.CreateIntegrationRequest(
        request_id="example-integration", integration=ep.Integration(
            name="example", description="example credentials (no real cloud)",
            provider=ep.INTEGRATION_PROVIDER_GENERIC), credentials={"EXAMPLE_TOKEN": "example-not-a-secret"}))
    client(client.executor.CreateStorage, ep.CreateStorageRequest(
        request_id="example-storage", storage=ep.Storage(name="example-local", kind=ep.STORAGE_KIND_LOCAL,
                                                         local_directory=state_dir or str(data_dir / "example-state"))))
    console.print(f"Blueprint [bold]{example.blueprint.name}[/bold] {example.blueprint.id} "
                  f"(templates: {', '.join(example.template_ids)}).")
