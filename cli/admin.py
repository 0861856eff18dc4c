"""`ik integration|secret|storage …`: what jobs run with. Credentials,
secret values and connection strings are read from files (never from the
command line, where shells and process lists keep them) and never printed."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from cli.connection import Client, console, fail
from cli.output import emit, enum_name, table
from infrakitchen.executor.v1 import executor_pb2 as ep

integration_app = typer.Typer(help="Cloud credentials for jobs.", no_args_is_help=True)
secret_app = typer.Typer(help="Secrets jobs may read.", no_args_is_help=True)
storage_app = typer.Typer(help="Where terraform state is kept.", no_args_is_help=True)

PROVIDERS = {enum_name(ep.IntegrationProvider, n, "INTEGRATION_PROVIDER_"): n
             for n in ep.IntegrationProvider.values() if n}
EXPOSURES = {enum_name(ep.SecretExposure, n, "SECRET_EXPOSURE_"): n for n in ep.SecretExposure.values() if n}


def _string_map(path: Path, what: str) -> dict[str, str]:
    """A JSON object of strings from a file; the error never shows its content."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror}", code=2)
    except ValueError:
        fail(f"{path} is not JSON: expected an object of {what}", code=2)
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        fail(f"{path}: expected a JSON object of {what} (string keys and values)", code=2)
    return data


@integration_app.command("create")
def integration_create(name: str = typer.Option(...), provider: str = typer.Option(
        ..., help=f"One of {', '.join(PROVIDERS)}."),
        credentials_file: Optional[Path] = typer.Option(
            None, help="JSON object of credential names and values (optional for oidc)."),
        description: str = typer.Option(""), max_concurrent_jobs: int = typer.Option(0),
        oidc_cloud: str = typer.Option("", help="oidc: aws, google, azure or generic."),
        oidc_audience: str = typer.Option("", help="oidc: the token's audience (see the README)."),
        oidc_role_arn: str = typer.Option("", help="oidc, aws: the role to assume."),
        oidc_service_account: str = typer.Option("", help="oidc, google: the service account to impersonate."),
        oidc_azure_client_id: str = typer.Option(""), oidc_azure_tenant_id: str = typer.Option(""),
        oidc_azure_subscription_id: str = typer.Option(""),
        oidc_token_file_env: str = typer.Option("", help="oidc, generic: the variable naming the token file."),
        token: Optional[str] = typer.Option(None)) -> None:
    """Stores credentials for jobs (their values are never shown again), or,
    for oidc, how jobs federate (no stored key: a token per job)."""
    if provider not in PROVIDERS:
        fail(f"--provider must be one of {', '.join(PROVIDERS)}", code=2)
    if credentials_file is None and provider != "oidc":
        fail("--credentials-file is required (but for --provider oidc)", code=2)
    oidc = ep.OidcFederation(cloud=oidc_cloud, audience=oidc_audience, role_arn=oidc_role_arn,
                             service_account_email=oidc_service_account, azure_client_id=oidc_azure_client_id,
                             azure_tenant_id=oidc_azure_tenant_id, azure_subscription_id=oidc_azure_subscription_id,
                             token_file_env=oidc_token_file_env) if provider == "oidc" else None
    client = Client(token)
    i = client(client.executor.CreateIntegration, ep.CreateIntegrationRequest(
        integration=ep.Integration(name=name, provider=PROVIDERS[provider], description=description,
                                   max_concurrent_jobs=max_concurrent_jobs, oidc=oidc),
        credentials=_string_map(credentials_file, "credential names and values") if credentials_file else {}))
    keys = f"with credentials {', '.join(i.credential_keys)}" if i.credential_keys else "with no stored credentials"
    console.print(f"Integration [bold]{i.id}[/bold] ({i.name}) {keys}.")


@integration_app.command("list")
def integration_list(token: Optional[str] = typer.Option(None)) -> None:
    client = Client(token)
    found = client.collect(client.executor.ListIntegrations, ep.ListIntegrationsRequest(), "integrations")

    def render():
        t = table("id", "name", "provider", "credentials", "max jobs")
        for i in found:
            t.add_row(i.id, i.name, enum_name(ep.IntegrationProvider, i.provider, "INTEGRATION_PROVIDER_"),
                      ", ".join(i.credential_keys), str(i.max_concurrent_jobs or ""))
        return t
    emit(found, render)


@integration_app.command("delete")
def integration_delete(integration_id: str, token: Optional[str] = typer.Option(None)) -> None:
    """Deletes an integration; refused, naming them, while resources use it."""
    client = Client(token)
    i = client(client.executor.GetIntegration, ep.GetIntegrationRequest(id=integration_id))
    client(client.executor.DeleteIntegration, ep.DeleteIntegrationRequest(id=i.id, etag=i.etag))
    console.print(f"Deleted integration [bold]{i.id}[/bold].")


@secret_app.command("create")
def secret_create(name: str = typer.Option(...), exposure: str = typer.Option(
        "tf_var", help=f"One of {', '.join(EXPOSURES)}."),
        values_file: Path = typer.Option(..., help="JSON object of secret names and values."),
        description: str = typer.Option(""), token: Optional[str] = typer.Option(None)) -> None:
    """Stores a secret for jobs (its values are never shown again)."""
    if exposure not in EXPOSURES:
        fail(f"--exposure must be one of {', '.join(EXPOSURES)}", code=2)
    client = Client(token)
    s = client(client.executor.CreateSecret, ep.CreateSecretRequest(
        secret=ep.Secret(name=name, exposure=EXPOSURES[exposure], description=description),
        values=_string_map(values_file, "secret names and values")))
    console.print(f"Secret [bold]{s.id}[/bold] ({s.name}) with keys {', '.join(s.keys)}.")


@secret_app.command("list")
def secret_list(token: Optional[str] = typer.Option(None)) -> None:
    client = Client(token)
    found = client.collect(client.executor.ListSecrets, ep.ListSecretsRequest(), "secrets")

    def render():
        t = table("id", "name", "exposure", "keys")
        for s in found:
            t.add_row(s.id, s.name, enum_name(ep.SecretExposure, s.exposure, "SECRET_EXPOSURE_"), ", ".join(s.keys))
        return t
    emit(found, render)


@secret_app.command("delete")
def secret_delete(secret_id: str, token: Optional[str] = typer.Option(None)) -> None:
    """Deletes a secret; refused, naming them, while resources use it."""
    client = Client(token)
    s = client(client.executor.GetSecret, ep.GetSecretRequest(id=secret_id))
    client(client.executor.DeleteSecret, ep.DeleteSecretRequest(id=s.id, etag=s.etag))
    console.print(f"Deleted secret [bold]{s.id}[/bold].")


@storage_app.command("create")
def storage_create(name: str = typer.Option(...),
                   local_directory: str = typer.Option("", help="State files under this directory."),
                   pg_connection_file: Optional[Path] = typer.Option(
                       None, help="A file holding the PostgreSQL connection string (it carries credentials)."),
                   pg_schema: str = typer.Option("", help="The schema for the states (PostgreSQL)."),
                   token: Optional[str] = typer.Option(None)) -> None:
    """Registers where terraform state is kept: a local directory, or PostgreSQL."""
    if bool(local_directory) == bool(pg_connection_file):
        fail("give one of --local-directory or --pg-connection-file", code=2)
    storage = ep.Storage(name=name)
    if local_directory:
        storage.kind, storage.local_directory = ep.STORAGE_KIND_LOCAL, local_directory
    else:
        try:
            connection = pg_connection_file.read_text().strip()
        except OSError as exc:
            fail(f"cannot read {pg_connection_file}: {exc.strerror}", code=2)
        storage.kind, storage.pg_connection_string, storage.pg_schema = ep.STORAGE_KIND_PG, connection, pg_schema
    client = Client(token)
    s = client(client.executor.CreateStorage, ep.CreateStorageRequest(storage=storage))
    console.print(f"Storage [bold]{s.id}[/bold] ({s.name}).")


@storage_app.command("list")
def storage_list(token: Optional[str] = typer.Option(None)) -> None:
    client = Client(token)
    found = client.collect(client.executor.ListStorages, ep.ListStoragesRequest(), "storages")

    def render():
        t = table("id", "name", "kind", "where")
        for s in found:
            t.add_row(s.id, s.name, enum_name(ep.StorageKind, s.kind, "STORAGE_KIND_"),
                      s.local_directory or s.pg_schema)
        return t
    emit(found, render)


@storage_app.command("delete")
def storage_delete(storage_id: str, token: Optional[str] = typer.Option(None)) -> None:
    """Deletes a storage; refused while it holds a resource's state."""
    client = Client(token)
    s = client(client.executor.GetStorage, ep.GetStorageRequest(id=storage_id))
    client(client.executor.DeleteStorage, ep.DeleteStorageRequest(id=s.id, etag=s.etag))
    console.print(f"Deleted storage [bold]{s.id}[/bold].")
