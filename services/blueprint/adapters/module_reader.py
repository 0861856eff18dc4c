"""Reads a Terraform/OpenTofu module at a git ref: its variables and outputs."""
from __future__ import annotations

import asyncio
import posixpath
import tempfile
from dataclasses import dataclass
from pathlib import Path

import hcl2

from services.blueprint.domain.model import ModuleSource, Output, Variable
from services.blueprint.domain.types import kind_of_expression
from services.common.errors import FieldViolation, InvalidArgument
from services.common.git import GitError, checkout


@dataclass
class Module:
    commit: str
    variables: list[Variable]
    outputs: list[Output]


def _problem(field: str, description: str) -> InvalidArgument:
    return InvalidArgument(f"source.{field}: {description}", [FieldViolation(f"source.{field}", description)])


def _unquote(value):
    """python-hcl2 keeps HCL quoting: '"text"' is a string literal, '${expr}' an expression."""
    if isinstance(value, str):
        if len(value) >= 2 and value.startswith('"') and value.endswith('"'):
            return value[1:-1].replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
        return value
    if isinstance(value, list):
        return [_unquote(v) for v in value]
    if isinstance(value, dict):
        return {_unquote(k): _unquote(v) for k, v in value.items() if k != "__is_block__"}
    return value


def _type_expr(value) -> str:
    text = str(value or "").strip()
    if text.startswith("${") and text.endswith("}"):
        text = text[2:-1].strip()
    return "" if text == "any" else text


def _blocks(parsed: dict, kind: str):
    for block in parsed.get(kind, []):
        for raw_name, body in block.items():
            yield _unquote(raw_name), body


def _where(exc: Exception) -> str:
    line, column = getattr(exc, "line", None), getattr(exc, "column", None)
    if isinstance(line, int) and line > 0:
        return f" at line {line}" + (f", column {column}" if isinstance(column, int) and column > 0 else "")
    return ""


def parse_module(files: dict[str, str]) -> tuple[list[Variable], list[Output]]:
    """Parses .tf file texts (name -> text). Raises InvalidArgument naming the file."""
    variables: dict[str, Variable] = {}
    outputs: dict[str, Output] = {}
    for name in sorted(files):
        try:
            parsed = hcl2.loads(files[name])
        except Exception as exc:  # noqa: BLE001 - the parser raises many kinds
            # File and line only: the parser's message quotes the text it choked
            # on, and a file is never echoed (it may be anything a symlink or a
            # careless commit put there).
            raise _problem("path", f"{name}: invalid HCL{_where(exc)}") from None
        for var_name, body in _blocks(parsed, "variable"):
            if var_name in variables:
                raise _problem("path", f"{name}: variable {var_name!r} is declared twice")
            has_default = "default" in body
            variables[var_name] = Variable(
                name=var_name, type=_type_expr(body.get("type")),
                description=str(_unquote(body.get("description", "")) or ""),
                has_default=has_default, default=_unquote(body.get("default")) if has_default else None,
                sensitive=bool(body.get("sensitive", False)), required=not has_default)
        for out_name, body in _blocks(parsed, "output"):
            if out_name in outputs:
                raise _problem("path", f"{name}: output {out_name!r} is declared twice")
            outputs[out_name] = Output(
                name=out_name, description=str(_unquote(body.get("description", "")) or ""),
                sensitive=bool(body.get("sensitive", False)), kind=kind_of_expression(body.get("value")))
    return list(variables.values()), list(outputs.values())


def _safe_subpath(path: str) -> str:
    normalised = posixpath.normpath(path.strip() or ".")
    if normalised.startswith("/") or normalised == ".." or normalised.startswith("../"):
        raise _problem("path", f"{path!r} must be a folder inside the repository")
    return "" if normalised == "." else normalised


async def read_module(source: ModuleSource) -> Module:
    subpath = _safe_subpath(source.path)
    with tempfile.TemporaryDirectory(prefix="ik-module-") as tmp:
        checkout_dir = Path(tmp) / "repo"
        try:
            commit = await checkout(source.repository_url, source.ref, checkout_dir)
        except GitError as exc:
            raise _problem(exc.field, exc.message) from None
        root = checkout_dir.resolve()
        folder = (checkout_dir / subpath).resolve()
        if not folder.is_relative_to(root):
            raise _problem("path", f"folder {subpath!r} leads outside the repository (a symbolic link)")
        if not folder.is_dir():
            raise _problem("path", f"folder {subpath!r} does not exist at {source.ref!r}")
        files = {}
        for tf in sorted(folder.glob("*.tf")):
            # Every file read must be the repository's own: a symlink to a file
            # of the machine (a key, a database) is refused, never read.
            if not tf.resolve().is_relative_to(root) or not tf.resolve().is_file():
                raise _problem("path", f"{tf.name} in {subpath or '.'!r} is a symbolic link that leads outside "
                                       "the repository")
            files[tf.name] = tf.read_text(errors="replace")
        if not files:
            raise _problem("path", f"folder {subpath or '.'!r} has no .tf files at {source.ref!r}")
    variables, outputs = await asyncio.to_thread(parse_module, files)
    return Module(commit=commit, variables=variables, outputs=outputs)
