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

from examples.catalog import TAG, Example, Registrar, admin_token, publish_modules
from infrakitchen.executor.v1 import executor_pb2 as ep
from infrakitchen.executor.v1 import executor_pb2_grpc

BLUEPRINT_NAME = "Team Environment"


def register(channel: grpc.Channel, metadata, repository_url: str, prefix: str = "") -> Example:
    """Creates the templates, versions and blueprint through BlueprintService.
    `prefix` namespaces keys and names (tests register several copies)."""
    r = Registrar(channel, metadata, repository_url, "team-example", prefix)
    labels = ["example", "testcloud"]
    r.template("team-network", "Team Network", "A network in the test cloud", [], labels)
    r.template("team-database", "Team Database", "A database in the team's network", ["team-network"], labels)
    r.template("team-bucket", "Team Bucket", "A bucket in the team's network", ["team-network"], labels)
    for key in ("team-network", "team-database", "team-bucket"):
        r.version(key)
    return r.blueprint(BLUEPRINT_NAME, "A network, a database and a bucket in the test cloud", labels,
                       {"team-network": {"name": f"{prefix}team-net"},
                        "team-database": {"name": f"{prefix}team-db", "size": 10},
                        "team-bucket": {"name": f"{prefix}team-files"}},
                       [("team-network", "network_id", "team-database", "network_id"),
                        ("team-network", "network_id", "team-bucket", "network_id")])


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
    token = admin_token(args.token, data_dir)
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
