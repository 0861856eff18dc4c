"""Real git repositories holding Terraform modules, made in a temp dir."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

EXAMPLE_MODULES = Path(__file__).resolve().parents[2] / "examples" / "modules"
_ENV = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t.invalid",
        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t.invalid"}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, env=_ENV, check=True, capture_output=True, text=True).stdout.strip()


class ModuleRepo:
    def __init__(self, path: Path):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        git(path, "init", "--quiet", "--initial-branch=main")

    @property
    def url(self) -> str:
        return self.path.as_uri()

    def write(self, relpath: str, text: str) -> None:
        target = self.path / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)

    def add_examples(self) -> None:
        for module in EXAMPLE_MODULES.iterdir():
            shutil.copytree(module, self.path / module.name, dirs_exist_ok=True)

    def commit(self, message: str = "change", tag: str | None = None) -> str:
        git(self.path, "add", "--all")
        git(self.path, "commit", "--quiet", "--allow-empty", "-m", message)
        if tag:
            git(self.path, "tag", "--force", tag)
        return git(self.path, "rev-parse", "HEAD")
