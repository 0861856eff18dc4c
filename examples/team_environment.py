"""Registers the "Team Environment" blueprint (network -> database + bucket)
on the test cloud (tests/testcloud), whose objects are real: ids, addresses,
endpoints and passwords come from the cloud, a database's `size` changes in
place and a new `engine` replaces it.

    python -m examples.team_environment [--repo DIR] [--target HOST:PORT] [--token TOKEN]
                                        [--cloud URL --cloud-token TOKEN --executor-target HOST:PORT]

Publishes examples/modules as a git repository (as the Production
Environment example does), creates the templates team-network,
team-database and team-bucket (the last two with team-network as parent
template), a version of each and the blueprint with its wiring rules. With
--cloud it also creates the integration jobs reach the cloud with (its
endpoint and token as TESTCLOUD_ENDPOINT / TESTCLOUD_TOKEN). `make run`
starts the cloud on 127.0.0.1:8790 with the token `dev` and lets jobs reach
it (IK_EXECUTOR_EGRESS_ALLOW). Safe to run again (fixed request ids)."""
from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path

import grpc
from google.protobuf import struct_pb2

from examples.production_environment import TAG, Example, publish_modules
from infrakitchen.blueprint.v1 import blueprint_pb2 as pb
from infrakitchen.blueprint.v1 import blueprint_pb2_grpc
from infrakitchen.executor.v1 import executor_pb2 as ep
from infrakitchen.executor.v1 import executor_pb2_grpc

BLUEPRINT_NAME = "Team Environment"
KEYS = ("team-network", "team-database", "team-bucket")


def register(channel: grpc.Channel, metadata, repository_url: str, prefix: str = "") -> Example:
    """Creates the templates, versions and blueprint through BlueprintService.
    `prefix` namespaces keys and names (tests register several copies)."""
    stub = blueprint_pb2_grpc.BlueprintServiceStub(channel)
    rid = "team-example-" + hashlib.sha256(f"{prefix}|{repository_url}".encode()).hexdigest()[:16]

    def template(key: str, name: str, description: str, parents: list[str]) -> str:
        return stub.CreateTemplate(pb.CreateTemplateRequest(
            request_id=f"{rid}-template-{key}",
            template=pb.Template(key=f"{prefix}{key}", name=f"{prefix}{name}", description=description,
                                 labels=["example", "testcloud"], enabled=True, parent_template_ids=parents)),
            metadata=metadata, timeout=30).id

    ids = {"team-network": template("team-network", "Team Network", "A network in the test cloud", [])}
    ids["team-database"] = template("team-database", "Team Database", "A database in the team's network",
                                    [ids["team-network"]])
    ids["team-bucket"] = template("team-bucket", "Team Bucket", "A bucket in the team's network",
                                  [ids["team-network"]])
    versions = {
        key: stub.CreateSourceCodeVersion(pb.CreateSourceCodeVersionRequest(
            request_id=f"{rid}-version-{key}", template_id=ids[key],
            source=pb.ModuleSource(repository_url=repository_url, ref=TAG, path=key),
            description=f"example {key} module {TAG}", is_default=True), metadata=metadata, timeout=60).id
        for key in KEYS}

    def defaults(**values) -> struct_pb2.Struct:
        s = struct_pb2.Struct()
        s.update(values)
        return s

    wiring = [("team-network", "network_id", "team-database", "network_id"),
              ("team-network", "network_id", "team-bucket", "network_id")]
    blueprint = stub.CreateBlueprint(pb.CreateBlueprintRequest(
        request_id=f"{rid}-blueprint",
        blueprint=pb.Blueprint(
            name=f"{prefix}{BLUEPRINT_NAME}", description="A network, a database and a bucket in the test cloud",
            labels=["example", "testcloud"],
            templates=[
                pb.BlueprintTemplate(template_id=ids["team-network"], source_code_version_id=versions["team-network"],
                                     default_variables=defaults(name=f"{prefix}team-net")),
                pb.BlueprintTemplate(template_id=ids["team-database"],
                                     source_code_version_id=versions["team-database"],
                                     default_variables=defaults(name=f"{prefix}team-db", size=10)),
                pb.BlueprintTemplate(template_id=ids["team-bucket"], source_code_version_id=versions["team-bucket"],
                                     default_variables=defaults(name=f"{prefix}team-files")),
            ],
            wiring_rules=[pb.WiringRule(source_template_id=ids[s], source_output=o,
                                        target_template_id=ids[t], target_variable=v) for s, o, t, v in wiring])),
        metadata=metadata, timeout=30)
    return Example(repository_url, ids, versions, blueprint)


def cloud_integration(channel: grpc.Channel, metadata, cloud_url: str, cloud_token: str, name: str = "testcloud") -> str:
    """The integration whose credentials point jobs at the test cloud; its id."""
    stub = executor_pb2_grpc.ExecutorServiceStub(channel)
    return stub.CreateIntegration(ep.CreateIntegrationRequest(
        request_id="team-example-integration-" + hashlib.sha256(f"{name}|{cloud_url}".encode()).hexdigest()[:16],
        integration=ep.Integration(name=name, provider=ep.INTEGRATION_PROVIDER_GENERIC,
                                   description="the test cloud (tests/testcloud)"),
        credentials={"TESTCLOUD_ENDPOINT": cloud_url, "TESTCLOUD_TOKEN": cloud_token}),
        metadata=metadata, timeout=30).id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data_dir = Path(os.environ.get("IK_DATA_DIR", ".data"))
    parser.add_argument("--repo", type=Path, default=data_dir / "example-modules")
    parser.add_argument("--target", default=os.environ.get("IK_BLUEPRINT_TARGET", "127.0.0.1:50051"))
    parser.add_argument("--executor-target", default=os.environ.get("IK_EXECUTOR_TARGET", "127.0.0.1:50054"))
    parser.add_argument("--cloud", default="", help="the test cloud's URL, e.g. http://127.0.0.1:8790")
    parser.add_argument("--cloud-token", default="dev")
    parser.add_argument("--token", default=os.environ.get("IK_TOKEN", ""))
    args = parser.parse_args()
    token = args.token
    if not token:
        from services.common.auth import Role, mint_token
        from services.common.config import load_or_create_secret
        token = mint_token(os.environ.get("IK_AUTH_SECRET") or load_or_create_secret(data_dir.resolve()),
                           "admin", Role.ADMIN)
    metadata = [("authorization", f"Bearer {token}")]
    url = publish_modules(args.repo)
    with grpc.insecure_channel(args.target) as channel:
        example = register(channel, metadata, url)
    print(f"modules: {url} @ {TAG}")
    for key, tid in example.template_ids.items():
        print(f"template {key:<13} {tid}  version {example.version_ids[key]}")
    print(f"blueprint {example.blueprint.name!r} {example.blueprint.id} (revision {example.blueprint.revision})")
    if args.cloud:
        with grpc.insecure_channel(args.executor_target) as channel:
            print(f"integration testcloud {cloud_integration(channel, metadata, args.cloud, args.cloud_token)}")


if __name__ == "__main__":
    main()
