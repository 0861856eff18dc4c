"""Checking out a git ref. Used to read modules and to run them.

Only the transports the platform supports are accepted: file://, https://,
ssh:// (and scp-like user@host:path), git://. Anything else git would
understand (`fd::17`, `ext::sh -c ...`, bare local paths) is refused up
front, and GIT_ALLOW_PROTOCOL keeps git itself (submodules included) to the
same list. Git runs non-interactive, with a timeout (IK_GIT_TIMEOUT, 30 s),
and dies with the service that started it."""
from __future__ import annotations

import asyncio
import os
import re
import shutil
from pathlib import Path

SCHEMES = ("file://", "https://", "ssh://", "git://")
ALLOWED_PROTOCOLS = "file:https:ssh:git"
# user@host:path, the scp-like form of ssh (a host name, then one colon).
_SCP_LIKE = re.compile(r"^[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:(?!:)[^\s]+$")
DEFAULT_TIMEOUT = float(os.environ.get("IK_GIT_TIMEOUT", "30"))


# util-linux's setpriv (in every Debian) makes the kernel kill git when the
# service that started it dies (PR_SET_PDEATHSIG), so no clone outlives a
# kill -9 of its service. It replaces a preexec_fn, which is unsafe in a
# process with threads (gRPC has several).
_DIE_WITH_PARENT = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []


def check_repository_url(url: str) -> str | None:
    """Why the URL is refused, or None."""
    if not url.strip():
        return "must not be empty"
    if url.startswith("-") or any(c.isspace() or ord(c) < 32 for c in url):
        return "is not a repository URL"
    if url.lower().startswith(SCHEMES) or _SCP_LIKE.match(url):
        return None
    return "must be a file://, https://, ssh://, git:// or user@host:path URL"


class GitError(Exception):
    """`field` says which part of the source is wrong: repository_url or ref."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


def redact_url(url: str) -> str:
    """Hides credentials embedded in a URL (https://user:token@host/...)."""
    return re.sub(r"(?<=://)[^/@\s]+@", "***@", url)


async def _git(*args: str, cwd: Path | None = None, timeout: float = DEFAULT_TIMEOUT) -> tuple[int, str]:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true", "LC_ALL": "C",
           "GIT_ALLOW_PROTOCOL": ALLOWED_PROTOCOLS, "GIT_SSH_COMMAND": "ssh -o BatchMode=yes"}
    proc = await asyncio.create_subprocess_exec(
        *_DIE_WITH_PARENT, "git", *args, cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return 124, f"git {args[0]} timed out after {timeout:.0f}s"
    return proc.returncode, out.decode(errors="replace").strip()


def _reason(out: str, fallback: str) -> str:
    """What git said, the lines that matter (its "fatal:" and "error:" lines,
    else the last ones), cut to a size an error message can carry."""
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    said = [line for line in lines if line.startswith(("fatal:", "error:"))] or lines[-3:]
    text = " ".join(said) or fallback
    return text if len(text) <= 400 else text[:399] + "…"


async def checkout(repository_url: str, ref: str, dest: Path, timeout: float = DEFAULT_TIMEOUT) -> str:
    """Clones the repository into `dest` (which must not exist), checks out
    `ref` (tag, branch or commit) and returns the commit id."""
    if problem := check_repository_url(repository_url):
        raise GitError("repository_url", problem)
    if not ref.strip() or ref.startswith("-"):
        raise GitError("ref", "must name a tag, branch or commit")
    code, out = await _git("clone", "--quiet", "--no-checkout", "--", repository_url, str(dest), timeout=timeout)
    if code != 0:
        raise GitError("repository_url", f"cannot read repository {redact_url(repository_url)}: "
                                         f"{redact_url(_reason(out, 'git clone failed'))}")
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
        raise GitError("ref", f"cannot check out {ref!r}: {_reason(out, 'git checkout failed')}")
    return commit
