"""The sandbox every terraform/tofu command of a job runs in: module code is
untrusted (any writer registers source code versions, and a `local-exec` or
a provider runs whatever it likes).

bubblewrap (`bwrap`, Debian's `bubblewrap`) builds a fresh root for each
command in new user, mount, pid, ipc and uts namespaces, with every
capability dropped. The command sees only:
- the system's programs and libraries (/usr, read-only) and the few /etc
  files name resolution and TLS need (not /etc as a whole: /etc/shadow);
- the terraform binary and the provider plugin mirror, read-only;
- the job's own working directory and the directory of its own local state;
- a private /tmp, a minimal /dev and a /proc of its own pid namespace (the
  executor's processes, environment and file descriptors are not there);
- directories an operator lists in IK_EXECUTOR_SANDBOX_BIND (say, a shared
  cache); nothing of the platform belongs there.
Not visible: the data directory (auth secret, encryption key, databases),
other jobs' directories and other resources' state.

The network is the job's own (IK_EXECUTOR_NETWORK=isolated, the default;
jobnet.py): the internet is reachable, nothing of the machine or of private
ranges is, but what IK_EXECUTOR_EGRESS_ALLOW lists (CIDRs, host:port); a pg
storage's state reaches terraform through the executor (pg_state), so no job
needs a route to a database. `shared` keeps the machine's network
(development only; a warning says so).

The executor says at start which isolation it uses, and refuses to start
without one unless IK_EXECUTOR_SANDBOX=off is set explicitly (development
only; a warning says so). Signals still reach terraform: the sandbox keeps
the process group the executor started it in (cancel's SIGINT, which
bubblewrap itself starts ignoring: see terraform._die_with_parent), and
--die-with-parent ends it with the executor."""
from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

from services.executor.adapters import jobnet

log = logging.getLogger(__name__)

OFF, BWRAP = "off", "bwrap"
ISOLATED, SHARED = "isolated", "shared"
# What programs need from /etc to resolve names, check TLS certificates and
# know users; read-only, and only those that exist.
ETC_FILES = ("/etc/resolv.conf", "/etc/hosts", "/etc/nsswitch.conf", "/etc/host.conf", "/etc/gai.conf",
             "/etc/passwd", "/etc/group", "/etc/localtime", "/etc/ssl", "/etc/ca-certificates",
             "/etc/pki", "/etc/alternatives", "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d")
# The merged-/usr links (or, on older systems, directories) of the root.
ROOT_LINKS = ("/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")


class SandboxUnavailable(RuntimeError):
    """No isolation could be set up: the executor does not start."""


@dataclass(frozen=True)
class Sandbox:
    kind: str
    bwrap: str = ""
    binds: tuple[str, ...] = field(default_factory=tuple)  # operator-listed read-write directories
    network: str = SHARED
    egress: tuple[str, ...] = field(default_factory=tuple)  # IK_EXECUTOR_EGRESS_ALLOW
    egress_deny: tuple[str, ...] = field(default_factory=tuple)  # IK_EXECUTOR_EGRESS_DENY

    @classmethod
    def from_env(cls, env: dict[str, str]) -> "Sandbox":
        mode = env.get("IK_EXECUTOR_SANDBOX", BWRAP).strip().lower()
        binds = tuple(p for p in env.get("IK_EXECUTOR_SANDBOX_BIND", "").split(":") if p.strip())
        if mode == OFF:
            log.warning("IK_EXECUTOR_SANDBOX=off: jobs run WITHOUT a sandbox and can read the platform's keys "
                        "and databases; for development only")
            return cls(OFF)
        if mode != BWRAP:
            raise SandboxUnavailable(f"IK_EXECUTOR_SANDBOX must be {BWRAP} or {OFF}, not {mode!r}")
        bwrap = shutil.which("bwrap") or ""
        if not bwrap:
            raise SandboxUnavailable("bubblewrap (bwrap) is not installed: `make install` installs it; "
                                     "IK_EXECUTOR_SANDBOX=off runs jobs unsandboxed (development only)")
        network = env.get("IK_EXECUTOR_NETWORK", ISOLATED).strip().lower()
        if network not in (ISOLATED, SHARED):
            raise SandboxUnavailable(f"IK_EXECUTOR_NETWORK must be {ISOLATED} or {SHARED}, not {network!r}")
        egress = tuple(e for e in re.split(r"[,\s]+", env.get("IK_EXECUTOR_EGRESS_ALLOW", "")) if e)
        deny = tuple(e for e in re.split(r"[,\s]+", env.get("IK_EXECUTOR_EGRESS_DENY", "")) if e)
        try:
            jobnet.parse_allow(list(egress))
            jobnet.parse_deny(list(deny))
        except jobnet.EgressError as exc:
            raise SandboxUnavailable(f"IK_EXECUTOR_EGRESS_ALLOW / _DENY: {exc}") from None
        if network == ISOLATED and (missing := [t for t in jobnet.TOOLS if not shutil.which(t)]):
            raise SandboxUnavailable(f"a job's own network needs {', '.join(missing)} (`make install` installs "
                                     "them); IK_EXECUTOR_NETWORK=shared keeps the machine's network "
                                     "(development only)")
        sandbox = cls(BWRAP, bwrap, binds, network, egress, deny)
        probe = subprocess.run(sandbox.wrap(["/bin/true"], cwd=Path("/"), writable=[]), capture_output=True,
                               text=True, timeout=30, stdin=subprocess.DEVNULL)
        if probe.returncode != 0:
            raise SandboxUnavailable(f"bubblewrap cannot create its namespaces here: "
                                     f"{probe.stderr.strip()[:300]}; IK_EXECUTOR_SANDBOX=off runs jobs "
                                     "unsandboxed (development only)")
        if network == ISOLATED:  # after bubblewrap's own probe: a failure here is the network's
            sandbox._probe_network()
        if network == SHARED:
            log.warning("IK_EXECUTOR_NETWORK=shared: jobs share the machine's network and can reach its "
                        "services (NATS, PostgreSQL, the platform's ports); for development only")
        log.info("jobs run in a bubblewrap sandbox (user, mount, pid, ipc, uts namespaces, no capabilities; "
                 "network %s)%s%s", "of their own" if network == ISOLATED else "shared",
                 f"; egress allowed to: {', '.join(egress)}" if egress and network == ISOLATED else "",
                 f"; operator binds: {', '.join(binds)}" if binds else "")
        return sandbox

    def _probe_network(self) -> None:
        """Sets a job's network up once, runs /bin/true in it, or says why not."""
        async def probe() -> tuple[int, str]:
            namespace = await jobnet.JobNamespace.start(list(self.egress), list(self.egress_deny))
            try:
                proc = await asyncio.create_subprocess_exec(
                    *self.wrap(["/bin/true"], cwd=Path("/"), writable=[], network=namespace),
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                _, err = await proc.communicate()
                return proc.returncode, err.decode(errors="replace")
            finally:
                await namespace.close()
        outcome: list = []

        def in_a_thread() -> None:  # its own loop: the executor's may be running on this thread
            try:
                outcome.append(asyncio.run(probe()))
            except Exception as exc:  # noqa: BLE001 - reported below
                outcome.append(exc)
        thread = threading.Thread(target=in_a_thread)
        thread.start()
        thread.join(60)
        result = outcome[0] if outcome else TimeoutError("no answer in 60s")
        if isinstance(result, Exception) or result[0] != 0:
            why = str(result) if isinstance(result, Exception) else result[1].strip()
            raise SandboxUnavailable(
                f"a job's own network cannot be set up here ({why[:300]}; pasta needs /dev/net/tun, nft a kernel "
                "with nftables); IK_EXECUTOR_NETWORK=shared keeps the machine's network (development only)")

    async def job_network(self) -> "jobnet.JobNamespace | None":
        """A job's own network, set up once for its commands, or None when jobs
        share the machine's network."""
        if not self.on or self.network != ISOLATED:
            return None
        return await jobnet.JobNamespace.start(list(self.egress), list(self.egress_deny))

    @property
    def on(self) -> bool:
        return self.kind != OFF

    def wrap(self, argv: list[str], *, cwd: Path, writable: list[Path], readable: list[str] = (),
             network: "jobnet.JobNamespace | None" = None) -> list[str]:
        """`argv` as run inside the sandbox (unchanged when it is off):
        `writable` directories (the job's own) and `readable` files or
        directories (binary, plugins) are the only paths of the platform it
        sees. With `network` (the job's namespace), it enters that first."""
        if not self.on:
            return argv
        args = [self.bwrap, "--die-with-parent", "--unshare-user", "--unshare-pid", "--unshare-ipc",
                "--unshare-uts", "--unshare-cgroup-try", "--cap-drop", "ALL", "--hostname", "job",
                "--ro-bind", "/usr", "/usr"]
        if network is not None:
            # No user namespace of its own inside: nothing to gain power over the network with.
            args[1:1] = ["--disable-userns"]
        for link in ROOT_LINKS:
            if os.path.islink(link):
                args += ["--symlink", os.readlink(link), link]
            elif os.path.isdir(link):
                args += ["--ro-bind", link, link]
        for path in ETC_FILES:
            args += ["--ro-bind-try", path, path]
        args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
        for path in readable:
            if path:
                args += ["--ro-bind", path, path]
        for path in writable:
            args += ["--bind", str(path), str(path)]
        for path in self.binds:
            args += ["--bind-try", path, path]
        if network is not None:  # names resolve through pasta's forwarder, the only resolver there
            args += ["--ro-bind", str(network.resolver), "/etc/resolv.conf"]
            return [*network.enter(), *args, "--chdir", str(cwd), "--", *argv]
        return [*args, "--chdir", str(cwd), "--", *argv]
