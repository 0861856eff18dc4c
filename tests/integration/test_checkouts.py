"""The executor reuses the tree of a commit it checked out before (real git):
the second job of a commit copies it instead of cloning; branches are
resolved by git every time; the cache keeps at most its number of entries."""
from __future__ import annotations

from services.executor.adapters.checkouts import CheckoutCache
from tests.support.gitrepos import ModuleRepo


def tree(path):
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


async def test_a_commit_checked_out_once_is_copied_the_next_time(tmp_path):
    repo = ModuleRepo(tmp_path / "repo")
    repo.write("m/main.tf", 'output "x" { value = 1 }\n')
    repo.commit("one", tag="v1")
    cache = CheckoutCache(tmp_path / "cache", max_entries=2)
    commit, reused = await cache.checkout(repo.url, "v1", tmp_path / "job1")  # a tag: resolved by git
    assert len(commit) == 40 and not reused
    again, reused = await cache.checkout(repo.url, commit, tmp_path / "job2")
    assert (again, reused) == (commit, True)
    assert tree(tmp_path / "job2") == {"m/main.tf": 'output "x" { value = 1 }\n'}
    assert not (tmp_path / "job2" / ".git").exists()
    # A job may change its copy; the kept tree is not changed by that.
    (tmp_path / "job2" / "m" / "main.tf").write_text("changed")
    _, reused = await cache.checkout(repo.url, commit, tmp_path / "job3")
    assert reused and (tmp_path / "job3" / "m" / "main.tf").read_text() == 'output "x" { value = 1 }\n'
    # Later commits: the least recently used entry goes beyond the limit.
    commits = [commit]
    for n in range(2):
        repo.write("m/main.tf", f'output "x" {{ value = {n + 2} }}\n')
        repo.commit(f"more {n}")
        made, reused = await cache.checkout(repo.url, "HEAD", tmp_path / f"new{n}")
        assert not reused, "a branch or HEAD is resolved by git each time"
        commits.append(made)
    kept = [p.name for repo_dir in (tmp_path / "cache").iterdir() for p in repo_dir.iterdir()
            if not p.name.startswith(".")]
    assert sorted(kept) == sorted(commits[1:])
