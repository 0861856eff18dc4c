"""What the examples register with: the example modules published as a git
repository, templates, source code versions and a blueprint through
BlueprintService, each create idempotent by a fixed request id (a second
run returns what the first made), and the admin token of a local platform."""
from __future__ import annotations

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


def struct(**values) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


class Registrar:
    """Creates an example's catalog; `prefix` namespaces keys and names (tests
    register several copies), `name` keeps two examples' request ids apart."""

    def __init__(self, channel: grpc.Channel, metadata, repository_url: str, name: str, prefix: str = ""):
        self.stub = blueprint_pb2_grpc.BlueprintServiceStub(channel)
        self.metadata, self.repository_url, self.prefix = metadata, repository_url, prefix
        self.rid = f"{name}-" + hashlib.sha256(f"{prefix}|{repository_url}".encode()).hexdigest()[:16]
        self.template_ids: dict[str, str] = {}
        self.version_ids: dict[str, str] = {}

    def template(self, key: str, name: str, description: str, parents: list[str], labels: list[str]) -> str:
        self.template_ids[key] = self.stub.CreateTemplate(pb.CreateTemplateRequest(
            request_id=f"{self.rid}-template-{key}",
            template=pb.Template(key=f"{self.prefix}{key}", name=f"{self.prefix}{name}", description=description,
                                 labels=labels, enabled=True,
                                 parent_template_ids=[self.template_ids[p] for p in parents])),
            metadata=self.metadata, timeout=30).id
        return self.template_ids[key]

    def version(self, key: str, configs: list[pb.VariableConfig] = ()) -> str:
        """The template's module `key` at TAG, its default version."""
        self.version_ids[key] = self.stub.CreateSourceCodeVersion(pb.CreateSourceCodeVersionRequest(
            request_id=f"{self.rid}-version-{key}", template_id=self.template_ids[key],
            source=pb.ModuleSource(repository_url=self.repository_url, ref=TAG, path=key),
            description=f"example {key} module {TAG}", is_default=True, variable_configs=list(configs)),
            metadata=self.metadata, timeout=60).id
        return self.version_ids[key]

    def blueprint(self, name: str, description: str, labels: list[str], defaults: dict[str, dict],
                  wiring: list[tuple[str, str, str, str]]) -> Example:
        """`defaults`: key -> default variables; `wiring`: (source, output, target, variable)."""
        ids, versions = self.template_ids, self.version_ids
        blueprint = self.stub.CreateBlueprint(pb.CreateBlueprintRequest(
            request_id=f"{self.rid}-blueprint",
            blueprint=pb.Blueprint(
                name=f"{self.prefix}{name}", description=description, labels=labels,
                templates=[pb.BlueprintTemplate(template_id=ids[k], source_code_version_id=versions[k],
                                                default_variables=struct(**values)) for k, values in defaults.items()],
                wiring_rules=[pb.WiringRule(source_template_id=ids[s], source_output=o, target_template_id=ids[t],
                                            target_variable=v) for s, o, t, v in wiring])),
            metadata=self.metadata, timeout=30)
        return Example(self.repository_url, dict(ids), dict(versions), blueprint)


def admin_token(given: str, data_dir: Path) -> str:
    """The token given, else an admin token of the local platform (its auth secret)."""
    if given:
        return given
    from services.common.auth import Role, mint_token
    from services.common.config import load_or_create_secret
    return mint_token(os.environ.get("IK_AUTH_SECRET") or load_or_create_secret(data_dir.resolve()), "admin",
                      Role.ADMIN)
