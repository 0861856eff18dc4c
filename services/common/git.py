"""Checking out a git ref (any URL git understands, including file:// and
local paths; no network is assumed). Used to read modules and to run them."""
from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path


class GitError(Exception):
    """`field` says which part of the source is wrong: repository_url or ref."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


def redact_url(url: str) -> str:
    """Hides credentials embedded in a URL (https://user:token@host/...)."""
    return re.sub(r"(?<=://)[^/@\s]+@", "***@", url)


async def _git(*args: str, cwd: Path | None = None, timeout: float = 120.0) -> tuple[int, str]:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true", "LC_ALL": "C"}
    proc = await asyncio.create_subprocess_exec(
        "git", *args, cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return 124, f"git {args[0]} timed out after {timeout:.0f}s"
    return proc.returncode, out.decode(errors="replace").strip()


async def checkout(repository_url: str, ref: str, dest: Path, timeout: float = 120.0) -> str:
    """Clones the repository into `dest` (which must not exist), checks out
    `ref` (tag, branch or commit) and returns the commit id."""
    if not repository_url.strip():
        raise GitError("repository_url", "must not be empty")
    if repository_url.startswith("-"):
        raise GitError("repository_url", "is not a repository URL")
    if not ref.strip() or ref.startswith("-"):
        raise GitError("ref", "must name a tag, branch or commit")
    code, out = await _git("clone", "--quiet", "--no-checkout", "--", repository_url, str(dest), timeout=timeout)
    if code != 0:
        last = out.splitlines()[-1] if out else "git clone failed"
        raise GitError("repository_url", f"cannot read repository {redact_url(repository_url)}: "
                                         f"{redact_url(last)}")
    commit = ""
    for candidate in (f"{ref}^{{commit}}", f"origin/{ref}^{{commit}}"):
        code, out = await _git("rev-parse", "--verify", "--quiet", candidate, cwd=dest)
        if code == 0 and out:
            commit = out.splitlines()[-1]
            break
    if not commit:
        raise GitError("ref", f"unknown ref {ref!r} in {redact_url(repository_url)}")
    code, out = await _git("-c", "advice.detachedHead=false", "checkout", "--quiet", commit, cwd=dest)
    if code != 0:
        raise GitError("ref", f"cannot check out {ref!r}: {out.splitlines()[-1] if out else ''}")
    return commit
