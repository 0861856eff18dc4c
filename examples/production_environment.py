"""Registers the seed's "Production Environment" blueprint (VPC -> EKS + RDS).

    python -m examples.production_environment [--repo DIR] [--target HOST:PORT] [--token TOKEN]

Publishes examples/modules as a git repository (tag v1.0.0) in DIR (default
<data dir>/example-modules), then creates the templates vpc, eks and rds (eks
and rds have vpc as parent template), a source code version of each, and the
blueprint with its wiring rules. Safe to run again: every create carries a
fixed request_id, so a second run returns what the first made."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import grpc

from examples.catalog import TAG, Example, Registrar, admin_token, publish_modules
from infrakitchen.blueprint.v1 import blueprint_pb2 as pb

__all__ = ["TAG", "Example", "publish_modules", "register"]
BLUEPRINT_NAME = "Production Environment"


def register(channel: grpc.Channel, metadata, repository_url: str, prefix: str = "") -> Example:
    """Creates the templates, versions and blueprint through BlueprintService.
    `prefix` namespaces keys and names (tests register several copies)."""
    r = Registrar(channel, metadata, repository_url, "example", prefix)
    r.template("vpc", "VPC", "Virtual private cloud", [], ["example"])
    r.template("eks", "EKS Cluster", "Kubernetes cluster", ["vpc"], ["example"])
    r.template("rds", "RDS Database", "Managed PostgreSQL", ["vpc"], ["example"])
    r.version("vpc", [pb.VariableConfig(name="name", frozen=True)])
    r.version("eks")
    r.version("rds")
    return r.blueprint(BLUEPRINT_NAME, "VPC, EKS cluster and RDS database", ["example", "production"],
                       {"vpc": {"name": "production"}, "eks": {"cluster_name": "production-eks"},
                        "rds": {"identifier": "production-db"}},
                       [("vpc", "vpc_id", "eks", "vpc_id"), ("vpc", "private_subnet_ids", "eks", "subnet_ids"),
                        ("vpc", "vpc_id", "rds", "vpc_id")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data_dir = Path(os.environ.get("IK_DATA_DIR", ".data"))
    parser.add_argument("--repo", type=Path, default=data_dir / "example-modules")
    parser.add_argument("--target", default=os.environ.get("IK_BLUEPRINT_TARGET", "127.0.0.1:50051"))
    parser.add_argument("--token", default=os.environ.get("IK_TOKEN", ""))
    args = parser.parse_args()
    token = admin_token(args.token, data_dir)
    url = publish_modules(args.repo)
    with grpc.insecure_channel(args.target) as channel:
        example = register(channel, [("authorization", f"Bearer {token}")], url)
    print(f"modules: {url} @ {TAG}")
    for key, tid in example.template_ids.items():
        print(f"template {key:<4} {tid}  version {example.version_ids[key]}")
    print(f"blueprint {example.blueprint.name!r} {example.blueprint.id} (revision {example.blueprint.revision})")


if __name__ == "__main__":
    main()
