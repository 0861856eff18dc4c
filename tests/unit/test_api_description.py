"""The API describes itself: every service, RPC, message, field, enum and
enum value in protos/ carries a comment, docs/api.md is what the protos
give, and `buf breaking` (in `make lint`) refuses an incompatible change."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2

from services.common.reflection import descriptor_set_path

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / ".tools" / "node_modules" / ".bin" / "buf"


def uncommented() -> dict[str, list[str]]:
    from scripts.api_reference import elements
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set_path().read_bytes()).file
    missing: dict[str, list[str]] = {k: [] for k in ("service", "rpc", "message", "enum", "field", "value")}
    for f in files:
        if f.name.startswith("infrakitchen/"):
            said = {tuple(loc.path) for loc in f.source_code_info.location
                    if (loc.leading_comments + loc.trailing_comments).strip()}
            for kind, path, name, _ in elements(f):
                if path not in said:
                    missing[kind].append(f"{f.name}: {name}")
    return missing


def test_every_service_rpc_message_field_enum_and_value_is_commented():
    missing = uncommented()
    for kind, names in missing.items():
        assert not names, f"{kind}s without a comment: {names[:10]}"


def test_the_api_reference_is_what_the_protos_give():
    check = subprocess.run([sys.executable, str(ROOT / "scripts" / "api_reference.py"), "--check"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr


def test_buf_breaking_refuses_an_incompatible_change(tmp_path):
    """The configuration `make lint` uses, on a copy: a removed field fails it, a new one does not."""
    assert BUF.exists(), "buf is installed by `make lint` (part of `make test`)"
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "protos", tmp_path / "protos")

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, timeout=60)
    git("init", "-q")
    git("-c", "user.email=t@example.com", "-c", "user.name=t", "add", ".")
    git("-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-qm", "base")
    proto = tmp_path / "protos" / "infrakitchen" / "workflow" / "v1" / "workflow.proto"
    text = proto.read_text()

    def breaking() -> subprocess.CompletedProcess:
        return subprocess.run([str(BUF), "breaking", "--against", ".git#ref=HEAD"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
    proto.write_text(text.replace("message ExecuteWorkflowRequest {\n",
                                  "message ExecuteWorkflowRequest {\n  string note = 99;\n", 1))
    assert breaking().returncode == 0  # adding a field is compatible
    proto.write_text(text.replace("  string id = 1 [(google.api.field_behavior) = REQUIRED];\n  // Apply this plan",
                                  "  // Apply this plan", 1))
    refused = breaking()
    assert refused.returncode != 0 and "ExecuteWorkflowRequest" in refused.stdout + refused.stderr
