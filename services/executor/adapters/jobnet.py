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

This module is stdlib only: the reaper (reaper.py, started with `python -S`)
runs it; the executor only prepares the job's rules (`prepare`)."""
from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

# A link-local address inside the namespace that pasta answers as the DNS
# resolver, forwarding to the machine's own (which may sit in a refused range).
DNS_ADDRESS = "169.254.0.53"
REFUSED_V4 = ("0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
              "192.0.0.0/24", "192.0.2.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24",
              "203.0.113.0/24", "224.0.0.0/3")
REFUSED_V6 = ("::/96", "::ffff:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48", "100::/64", "2001::/32", "2001:10::/28",
              "2001:20::/28", "2001:db8::/32", "2002::/16", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8")
RULES, RESOLV, SETTINGS = "rules.nft", "resolv.conf", "network.json"
# What a namespace needs: the executor refuses to start in isolated mode without them.
TOOLS = ("unshare", "nft", "pasta", "setpriv", "ip", "bash")


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


def prepare(directory: Path, allow: list[str], deny: list[str] = ()) -> Path:
    """Writes a job's network settings (rules, resolver, forwarded loopback
    ports) into `directory`, outside what its sandbox sees; returns it.
    `allow` wins over the refused ranges and `deny`."""
    networks, services = parse_allow(allow)
    loopback = sorted({p for a, p in services if ipaddress.ip_address(a).is_loopback})
    services = [(a, p) for a, p in services if not ipaddress.ip_address(a).is_loopback]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / RULES).write_text(rules(networks, services, _machine_addresses(), parse_deny(list(deny))))
    (directory / RESOLV).write_text(f"nameserver {DNS_ADDRESS}\noptions edns0\n")
    (directory / SETTINGS).write_text(json.dumps({"loopback_ports": loopback}))
    return directory


# Root only inside the job's new user namespace: loads the rules, says so,
# waits until pasta connected the namespace, then becomes the sandbox.
_STAGE = r'''set -e
echo ns >&"$IK_NET_W"
nft -f "$IK_NET_RULES"
echo ready >&"$IK_NET_W"; exec {IK_NET_W}>&-
read go <&"$IK_NET_R"; exec {IK_NET_R}<&-
[ "$go" = go ] || exit 111
exec "$@"
'''


def run(directory: str, argv: list[str], preexec) -> int:
    """Runs `argv` (a bubblewrap command) in a new network namespace set up
    from `directory`; returns its exit status (Popen's)."""
    settings = json.loads(Path(directory, SETTINGS).read_text())
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    env = dict(os.environ, IK_NET_RULES=str(Path(directory, RULES)), IK_NET_W=str(ready_w), IK_NET_R=str(go_r))
    child = subprocess.Popen(["unshare", "--user", "--map-root-user", "--net", "--", "bash", "-c", _STAGE,
                              "job-network", *argv], env=env, pass_fds=(ready_w, go_r), preexec_fn=preexec)
    os.close(ready_w)
    os.close(go_r)
    pasta = None
    pidfile = Path(directory, "pasta.pid")
    pidfile.unlink(missing_ok=True)
    said = os.fdopen(ready_r, "rb", buffering=0)
    try:
        if said.readline().strip() != b"ns":
            return child.wait()
        ports = ",".join(map(str, settings["loopback_ports"])) or "none"
        command = [shutil.which("setpriv") or "setpriv", "--pdeathsig", "KILL", "--",
                   shutil.which("pasta") or "pasta", "-f", "-q", "--config-net", "--no-map-gw",
                   "-t", "none", "-u", "none", "-T", ports, "-U", ports, "--dns-forward", DNS_ADDRESS,
                   "-P", str(pidfile), "--userns", f"/proc/{child.pid}/ns/user",
                   "--netns", f"/proc/{child.pid}/ns/net"]
        if os.getuid() == 0:  # otherwise pasta becomes nobody and cannot join the namespace
            command[5:5] = ["--runas", "0"]
        # Its own session: the cancel's SIGINT to the command's group must not take the network away.
        pasta = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True,
                                 env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})  # nothing of the job's
        if said.readline().strip() != b"ready":  # the rules did not load: nothing runs
            return child.wait()
        deadline = time.monotonic() + 10
        # pasta writes its pid file once the namespace's addresses and routes are set.
        while not (pidfile.exists() and pidfile.stat().st_size):
            if pasta.poll() is not None or time.monotonic() > deadline:
                sys.stderr.write("Error: the job's network could not be set up (pasta did not start)\n")
                child.kill()
                child.wait()
                return 112
            time.sleep(0.002)
        os.write(go_w, b"go\n")
        return child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        said.close()
        os.close(go_w)
        if pasta is not None and pasta.poll() is None:
            pasta.kill()  # pasta does not end with the namespace; its teardown is off the command's path
            threading.Thread(target=pasta.wait).start()
