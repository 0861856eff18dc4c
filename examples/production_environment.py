"""Registers the seed's "Production Environment" blueprint (VPC -> EKS + RDS).

    python -m examples.production_environment [--repo DIR] [--target HOST:PORT] [--token TOKEN]

Publishes examples/modules as a git repository (tag v1.0.0) in DIR (default
<data dir>/example-modules), then creates the templates vpc, eks and rds (eks
and rds have vpc as parent template), a source code version of each, and the
blueprint with its wiring rules. Safe to run again: every create carries a
fixed request_id, so a second run returns what the first made."""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import struct_pb2

from infrakitchen.blueprint.v1 import blueprint_pb2 as pb
from infrakitchen.blueprint.v1 import blueprint_pb2_grpc

MODULES = Path(__file__).resolve().parent / "modules"
TAG = "v1.0.0"
BLUEPRINT_NAME = "Production Environment"


@dataclass
class Example:
    repository_url: str
    template_ids: dict[str, str]  # key -> id
    version_ids: dict[str, str]
    blueprint: pb.Blueprint


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "InfraKitchen", "GIT_AUTHOR_EMAIL": "examples@infrakitchen.invalid",
           "GIT_COMMITTER_NAME": "InfraKitchen", "GIT_COMMITTER_EMAIL": "examples@infrakitchen.invalid"}
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True).stdout


def publish_modules(repo: Path) -> str:
    """Makes (or refreshes) a git repository holding the example modules; returns its file:// URL."""
    repo.mkdir(parents=True, exist_ok=True)
    if not (repo / ".git").exists():
        _git(repo, "init", "--quiet", "--initial-branch=main")
    for module in MODULES.iterdir():
        if module.is_dir():
            shutil.copytree(module, repo / module.name, dirs_exist_ok=True)
    _git(repo, "add", "--all")
    if _git(repo, "status", "--porcelain").strip():
        _git(repo, "commit", "--quiet", "-m", "example modules")
    _git(repo, "tag", "--force", TAG)
    return repo.resolve().as_uri()


def register(channel: grpc.Channel, metadata, repository_url: str, prefix: str = "") -> Example:
    """Creates the templates, versions and blueprint through BlueprintService.
    `prefix` namespaces keys and names (tests register several copies)."""
    stub = blueprint_pb2_grpc.BlueprintServiceStub(channel)
    rid = "example-" + hashlib.sha256(f"{prefix}|{repository_url}".encode()).hexdigest()[:16]

    def template(key: str, name: str, description: str, parents: list[str]) -> str:
        return stub.CreateTemplate(pb.CreateTemplateRequest(
            request_id=f"{rid}-template-{key}",
            template=pb.Template(key=f"{prefix}{key}", name=f"{prefix}{name}", description=description,
                                 labels=["example"], enabled=True, parent_template_ids=parents)),
            metadata=metadata, timeout=30).id

    ids: dict[str, str] = {}
    ids["vpc"] = template("vpc", "VPC", "Virtual private cloud", [])
    ids["eks"] = template("eks", "EKS Cluster", "Kubernetes cluster", [ids["vpc"]])
    ids["rds"] = template("rds", "RDS Database", "Managed PostgreSQL", [ids["vpc"]])
    versions = {
        key: stub.CreateSourceCodeVersion(pb.CreateSourceCodeVersionRequest(
            request_id=f"{rid}-version-{key}", template_id=ids[key],
            source=pb.ModuleSource(repository_url=repository_url, ref=TAG, path=key),
            description=f"example {key} module {TAG}", is_default=True,
            variable_configs=[pb.VariableConfig(name="name", frozen=True)] if key == "vpc" else []),
            metadata=metadata, timeout=60).id
        for key in ("vpc", "eks", "rds")}

    def defaults(**values) -> struct_pb2.Struct:
        s = struct_pb2.Struct()
        s.update(values)
        return s

    wiring = [("vpc", "vpc_id", "eks", "vpc_id"), ("vpc", "private_subnet_ids", "eks", "subnet_ids"),
              ("vpc", "vpc_id", "rds", "vpc_id")]
    blueprint = stub.CreateBlueprint(pb.CreateBlueprintRequest(
        request_id=f"{rid}-blueprint",
        blueprint=pb.Blueprint(
            name=f"{prefix}{BLUEPRINT_NAME}", description="VPC, EKS cluster and RDS database",
            labels=["example", "production"],
            templates=[
                pb.BlueprintTemplate(template_id=ids["vpc"], source_code_version_id=versions["vpc"],
                                     default_variables=defaults(name="production")),
                pb.BlueprintTemplate(template_id=ids["eks"], source_code_version_id=versions["eks"],
                                     default_variables=defaults(cluster_name="production-eks")),
                pb.BlueprintTemplate(template_id=ids["rds"], source_code_version_id=versions["rds"],
                                     default_variables=defaults(identifier="production-db")),
            ],
            wiring_rules=[pb.WiringRule(source_template_id=ids[s], source_output=o,
                                        target_template_id=ids[t], target_variable=v) for s, o, t, v in wiring])),
        metadata=metadata, timeout=30)
    return Example(repository_url, ids, versions, blueprint)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data_dir = Path(os.environ.get("IK_DATA_DIR", ".data"))
    parser.add_argument("--repo", type=Path, default=data_dir / "example-modules")
    parser.add_argument("--target", default=os.environ.get("IK_BLUEPRINT_TARGET", "127.0.0.1:50051"))
    parser.add_argument("--token", default=os.environ.get("IK_TOKEN", ""))
    args = parser.parse_args()
    token = args.token
    if not token:
        from services.common.auth import Role, mint_token
        from services.common.config import load_or_create_secret
        token = mint_token(os.environ.get("IK_AUTH_SECRET") or load_or_create_secret(data_dir.resolve()),
                           "admin", Role.ADMIN)
    url = publish_modules(args.repo)
    with grpc.insecure_channel(args.target) as channel:
        example = register(channel, [("authorization", f"Bearer {token}")], url)
    print(f"modules: {url} @ {TAG}")
    for key, tid in example.template_ids.items():
        print(f"template {key:<4} {tid}  version {example.version_ids[key]}")
    print(f"blueprint {example.blueprint.name!r} {example.blueprint.id} (revision {example.blueprint.revision})")


if __name__ == "__main__":
    main()
