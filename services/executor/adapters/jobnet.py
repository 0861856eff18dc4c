"""A job's own network: every terraform command of a job runs in a new network
namespace whose only way out is pasta (Debian's `passt` package, a user-mode
network stack), behind nftables rules loaded before the command starts.

Why this way: module code and providers must reach the internet (provider
registries, cloud APIs; TCP and UDP, databases included), but nothing of the
machine they run on. pasta gives the namespace outbound connectivity made
from the executor's own sockets, with no route to the host's loopback
(`--no-map-gw`, no port forwarded by default); the rules, loaded by a step
that is root only inside the job's user namespace and that the command
(with every capability dropped, in a nested user namespace, by bubblewrap)
cannot change, refuse every private, loopback, link-local (the cloud
metadata endpoint 169.254.169.254) and multicast range and every address of
the machine itself. Rules apply per packet, after name resolution, so a
name that resolves to 127.0.0.1 or 10.x is refused like the address.
Allowed destinations (IK_EXECUTOR_EGRESS_ALLOW) are let through before the
refusals: CIDRs, and host:port pairs (TCP and UDP); a loopback host:port is
forwarded by pasta to that one port of the machine's loopback. Names
resolve through pasta's DNS forwarder (DNS_ADDRESS, the namespace's only
resolver), the machine's resolver staying unreachable otherwise.

The namespace is set up once per job (JobNamespace: one pasta start, one
rules load) and each of its terraform commands enters it with nsenter."""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import subprocess
import tempfile
from pathlib import Path

# A link-local address inside the namespace that pasta answers as the DNS
# resolver, forwarding to the machine's own (which may sit in a refused range).
DNS_ADDRESS = "169.254.0.53"
REFUSED_V4 = ("0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
              "192.0.0.0/24", "192.0.2.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24",
              "203.0.113.0/24", "224.0.0.0/3")
REFUSED_V6 = ("::/96", "::ffff:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48", "100::/64", "2001::/32", "2001:10::/28",
              "2001:20::/28", "2001:db8::/32", "2002::/16", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8")
RULES = "rules.nft"
# What a namespace needs: the executor refuses to start in isolated mode without them.
TOOLS = ("unshare", "nsenter", "nft", "pasta", "setpriv", "ip", "bash", "sleep")


class EgressError(ValueError):
    """An allow entry that is not a CIDR, an address:port or a host:port."""


def parse_allow(entries: list[str]) -> tuple[list[str], list[tuple[str, int]]]:
    """CIDRs (or single addresses) and (address, port) pairs. A host name is
    resolved now, once per job: the rules hold addresses."""
    networks: list[str] = []
    services: list[tuple[str, int]] = []
    for raw in entries:
        entry = raw.strip()
        if not entry:
            continue
        try:
            networks.append(str(ipaddress.ip_network(entry, strict=False)))
            continue
        except ValueError:
            pass
        host, sep, port = entry.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
            raise EgressError(f"egress entry {entry[:100]!r} is neither a CIDR nor host:port")
        host = host.strip("[]")
        try:
            addresses = [str(ipaddress.ip_address(host))]
        except ValueError:
            import socket
            try:
                addresses = sorted({info[4][0] for info in socket.getaddrinfo(host, int(port))})
            except OSError:
                raise EgressError(f"egress entry {entry[:100]!r}: {host[:80]!r} does not resolve") from None
        services += [(address, int(port)) for address in addresses]
    return networks, services


def _machine_addresses() -> list[str]:
    """Every address of this machine and the networks it is on."""
    out = subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True, timeout=10, check=True).stdout
    found = []
    for link in json.loads(out):
        for a in link.get("addr_info", []):
            interface = ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}")
            found += [str(interface.ip), str(interface.network)]
    return found


def rules(networks: list[str], services: list[tuple[str, int]], machine: list[str], deny: list[str] = ()) -> str:
    def elements(items) -> str:
        return ("elements = { " + ", ".join(items) + " }") if items else ""
    v4 = lambda x: ipaddress.ip_network(x, strict=False).version == 4  # noqa: E731
    refused4 = [*REFUSED_V4, *(m for m in [*machine, *deny] if v4(m))]
    refused6 = [*REFUSED_V6, *(m for m in [*machine, *deny] if not v4(m))]
    allowed4 = [n for n in networks if v4(n)]
    allowed6 = [n for n in networks if not v4(n)]
    services4 = [f"{a} . {p}" for a, p in services if v4(a)]
    services6 = [f"{a} . {p}" for a, p in services if not v4(a)]
    return f"""table inet job {{
  set refused4 {{ type ipv4_addr; flags interval; auto-merge; {elements(refused4)} }}
  set refused6 {{ type ipv6_addr; flags interval; auto-merge; {elements(refused6)} }}
  set allowed4 {{ type ipv4_addr; flags interval; auto-merge; {elements(allowed4)} }}
  set allowed6 {{ type ipv6_addr; flags interval; auto-merge; {elements(allowed6)} }}
  set services4 {{ type ipv4_addr . inet_service; {elements(services4)} }}
  set services6 {{ type ipv6_addr . inet_service; {elements(services6)} }}
  chain out {{
    type filter hook output priority filter; policy accept;
    oifname "lo" accept
    ip daddr {DNS_ADDRESS} meta l4proto {{ tcp, udp }} th dport 53 accept
    meta l4proto {{ tcp, udp }} ip daddr . th dport @services4 accept
    meta l4proto {{ tcp, udp }} ip6 daddr . th dport @services6 accept
    ip daddr @allowed4 accept
    ip6 daddr @allowed6 accept
    ip daddr @refused4 reject with icmpx type admin-prohibited
    ip6 daddr @refused6 reject with icmpx type admin-prohibited
  }}
}}
"""


def parse_deny(entries: list[str]) -> list[str]:
    """CIDRs an operator refuses besides the built-in ranges (a cluster's
    global IPv6 ranges, a VPC's public addresses)."""
    try:
        return [str(ipaddress.ip_network(e.strip(), strict=False)) for e in entries if e.strip()]
    except ValueError as exc:
        raise EgressError(f"egress deny entry is not a CIDR: {str(exc)[:100]}") from None


def resolver_file() -> Path:
    """The resolver every job's sandbox sees (the same for all: pasta's
    forwarder), in the machine's temporary directory."""
    path = Path(tempfile.gettempdir()) / "infrakitchen-job-resolv.conf"
    text = f"nameserver {DNS_ADDRESS}\noptions edns0\n"
    try:
        if path.read_text() == text and not path.is_symlink():
            return path
    except OSError:
        pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    tmp.chmod(0o644)
    os.replace(tmp, path)
    return path


def prepare(directory: Path, allow: list[str], deny: list[str] = ()) -> list[int]:
    """Writes a job's rules into `directory` (RULES), outside what its sandbox
    sees; returns the loopback ports pasta forwards. `allow` wins over the
    refused ranges and `deny`."""
    networks, services = parse_allow(allow)
    loopback = sorted({p for a, p in services if ipaddress.ip_address(a).is_loopback})
    services = [(a, p) for a, p in services if not ipaddress.ip_address(a).is_loopback]
    (directory / RULES).write_text(rules(networks, services, _machine_addresses(), parse_deny(list(deny))))
    return loopback


# Root only inside the job's new user namespace, with an empty environment:
# loads the rules, says so, then holds the namespace for the job's commands.
_HOLD = r'''set -e
echo ns >&"$IK_NET_W"
nft -f "$1"
echo ready >&"$IK_NET_W"
exec {IK_NET_W}>&-
exec sleep infinity
'''


class JobNamespace:
    """A job's network namespace, set up once for all its commands: a holder
    process (root only inside its own user namespace) that loaded the rules,
    and pasta attached to it. Each command enters it (`enter`) and runs its
    sandbox there; `close` ends both. Both die with the executor (parent-death
    signal) and sit in sessions of their own, so a cancel's SIGINT to a
    command's group does not take the network away.

    Start and close it on the event loop's thread: the parent-death signal
    is tied to the thread that started the process."""

    def __init__(self, holder: asyncio.subprocess.Process, pasta: asyncio.subprocess.Process | None,
                 resolver: Path):
        self.holder = holder
        self.pasta = pasta
        self.resolver = resolver  # what its commands' sandboxes see as /etc/resolv.conf

    @classmethod
    async def start(cls, allow: list[str], deny: list[str] = (), timeout: float = 10.0) -> "JobNamespace":
        """Once the rules are loaded and pasta connected the namespace, the
        settings' directory is gone: nothing of it stays beside the job."""
        with tempfile.TemporaryDirectory(prefix="ik-job-network-") as tmp:
            loopback = await asyncio.to_thread(prepare, Path(tmp), allow, deny)
            resolver = await asyncio.to_thread(resolver_file)
            return await cls._start(Path(tmp), loopback, resolver, timeout)

    @classmethod
    async def _start(cls, directory: Path, loopback: list[int], resolver: Path, timeout: float) -> "JobNamespace":
        said_r, said_w = os.pipe()
        path = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}  # nothing of the executor's or the job's
        try:
            holder = await asyncio.create_subprocess_exec(
                "setpriv", "--pdeathsig", "KILL", "--", "unshare", "--user", "--map-root-user", "--net", "--",
                "bash", "-c", _HOLD, "job-network", str(directory / RULES), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, pass_fds=(said_w,),
                env={**path, "IK_NET_W": str(said_w)}, start_new_session=True)
        finally:
            os.close(said_w)
        reader = os.fdopen(said_r, "rb", buffering=0)
        ns = cls(holder, None, resolver)
        try:
            async with asyncio.timeout(timeout):
                if await asyncio.to_thread(reader.readline) != b"ns\n":
                    raise NetworkUnavailable(await ns._holder_error())
                ports = ",".join(map(str, loopback)) or "none"
                command = ["setpriv", "--pdeathsig", "KILL", "--", "pasta", "-f", "-q", "--config-net",
                           "--no-map-gw", "-t", "none", "-u", "none", "-T", ports, "-U", ports,
                           "--dns-forward", DNS_ADDRESS, "-P", str(directory / "pasta.pid"),
                           "--userns", f"/proc/{holder.pid}/ns/user", "--netns", f"/proc/{holder.pid}/ns/net"]
                if os.getuid() == 0:  # otherwise pasta becomes nobody and cannot join the namespace
                    command[5:5] = ["--runas", "0"]
                # Started while the rules load: pasta takes the longer of the two.
                ns.pasta = await asyncio.create_subprocess_exec(
                    *command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    env=path, start_new_session=True)
                if await asyncio.to_thread(reader.readline) != b"ready\n":  # the rules did not load
                    raise NetworkUnavailable(await ns._holder_error())
                pidfile = directory / "pasta.pid"
                # pasta writes its pid file once the namespace's addresses and routes are set.
                while not (pidfile.exists() and pidfile.stat().st_size):
                    if ns.pasta.returncode is not None:
                        raise NetworkUnavailable("pasta did not start")
                    await asyncio.sleep(0.002)
        except TimeoutError:
            await ns.close()
            raise NetworkUnavailable(f"the job's network was not ready in {timeout:.0f}s") from None
        except BaseException:
            await ns.close()
            raise
        finally:
            reader.close()
        return ns

    async def _holder_error(self) -> str:
        try:
            async with asyncio.timeout(2):
                text = (await self.holder.stderr.read(2000)).decode(errors="replace").strip()
        except TimeoutError:
            text = ""
        return f"the job's network could not be set up: {text[:300] or 'no reason given'}"

    def enter(self) -> list[str]:
        """What runs a command inside the namespace (before its sandbox's argv)."""
        # A non-root executor (in a container, uid 10001) keeps its credentials:
        # nsenter would call setgroups(), which the user namespace it made denies,
        # and they map to root inside it anyway. As root, nsenter clears the
        # supplementary groups, so the job gets none of the executor's.
        keep = ["--preserve-credentials"] if os.getuid() != 0 else []
        return ["nsenter", "--target", str(self.holder.pid), "--user", "--net", *keep, "--"]

    async def close(self) -> None:
        for proc in (self.pasta, self.holder):
            if proc is not None and proc.returncode is None:
                try:
                    proc.kill()
                except ProcessLookupError:
                    pass
        for proc in (self.pasta, self.holder):
            if proc is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(proc.wait(), 5)


class NetworkUnavailable(RuntimeError):
    """A job's network namespace could not be set up."""
