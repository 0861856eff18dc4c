"""Source trees of commits already checked out, reused by later jobs.

A commit never changes, so the second job of a commit copies the tree kept
from the first instead of cloning the repository again (three git processes
and the transfer). Only full commit ids are cached: a branch or tag is
resolved by git each time. Entries live outside every job's sandbox (jobs
get a copy, never the entry) and the least recently used are removed beyond
`max_entries`."""
from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import uuid
from pathlib import Path

from services.common.git import checkout

_COMMIT = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


class CheckoutCache:
    def __init__(self, directory: Path, max_entries: int = 256):
        self.directory = directory
        self.max_entries = max_entries

    def _entry(self, repository_url: str, commit: str) -> Path:
        return self.directory / hashlib.sha256(repository_url.encode()).hexdigest()[:32] / commit

    async def checkout(self, repository_url: str, ref: str, dest: Path) -> tuple[str, bool]:
        """(the commit, whether the tree came from the cache) with the tree in `dest`."""
        if self.max_entries > 0 and _COMMIT.fullmatch(ref):
            entry = self._entry(repository_url, ref)
            if entry.is_dir():
                try:
                    await asyncio.to_thread(shutil.copytree, entry, dest, symlinks=True)
                    os.utime(entry)  # recently used
                    return ref, True
                except (OSError, shutil.Error):
                    shutil.rmtree(dest, ignore_errors=True)  # e.g. pruned meanwhile: clone instead
        commit = await checkout(repository_url, ref, dest)
        if self.max_entries > 0:
            await asyncio.to_thread(self._keep, dest, self._entry(repository_url, commit))
        return commit, False

    def _keep(self, tree: Path, entry: Path) -> None:
        if entry.exists():
            return
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = entry.with_name(f".{entry.name}.{uuid.uuid4().hex}")
        try:
            shutil.copytree(tree, staging, symlinks=True, ignore=shutil.ignore_patterns(".git"))
            os.rename(staging, entry)  # atomic; another job may have kept the same commit first
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            return
        self._prune()

    def _prune(self) -> None:
        entries = [e for repo in self.directory.iterdir() if repo.is_dir()
                   for e in repo.iterdir() if e.is_dir() and not e.name.startswith(".")]
        if len(entries) <= self.max_entries:
            return
        entries.sort(key=lambda e: e.stat().st_mtime)
        for stale in entries[:len(entries) - self.max_entries]:
            shutil.rmtree(stale, ignore_errors=True)
