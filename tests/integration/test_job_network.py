"""A job has its own network (issue 28): a probe module run by a `write` user
tries every way out to the platform and the machine: the five gRPC ports,
NATS, PostgreSQL, a listener on 127.0.0.1, one on another address of the
machine, one on a link-local address (in a network namespace the test makes,
never a real metadata service) and a name resolving to loopback. With the
job's own network every one is refused, but for the listener the operator
allowed (IK_EXECUTOR_EGRESS_ALLOW); with the machine's network the same
probe reaches them all, so the test can fail.

Needs root (it adds two veth pairs and a network namespace,
and removes them)."""
from __future__ import annotations

import os
import socket
import subprocess
import threading
import uuid

import pytest

from infrakitchen.resource.v1 import resource_pb2 as rp
from tests.support.jobs import all_logs, log_text
from tests.support.platform import Platform, struct
from tests.support.processes import free_port

PROBE = '''
variable "targets" {
  type = list(string)
}
resource "null_resource" "probe" {
  triggers = { targets = join(",", var.targets) }
  provisioner "local-exec" {
    interpreter = ["/bin/bash", "-c"]
    command = <<EOT
for t in ${join(" ", var.targets)}; do
  name=$${t%%=*}; hostport=$${t#*=}; host=$${hostport%:*}; port=$${hostport##*:}
  if timeout 3 bash -c "exec 3<>/dev/tcp/$host/$port" 2>/dev/null; then echo "REACHED $name"; else echo "REFUSED $name"; fi
done
EOT
  }
}
'''

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="adds interfaces and a network namespace: needs root")


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=20)


def listen(address: str, port: int, stop: threading.Event, netns: str = "") -> None:
    """A listener that greets whoever connects."""
    if netns:  # inside the namespace, with the machine's own Python
        code = ("import socket; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
                f"s.bind(({address!r}, {port})); s.listen(8)\nwhile True:\n c,_=s.accept(); c.sendall(b'hi'); c.close()")
        proc = subprocess.Popen(["ip", "netns", "exec", netns, "python3", "-c", code])
        threading.Thread(target=lambda: (stop.wait(), proc.kill(), proc.wait()), daemon=True).start()
        return
    server = socket.socket(socket.AF_INET)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((address, port))
    server.listen(8)
    server.settimeout(0.2)

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            conn.sendall(b"hi")
            conn.close()
        server.close()
    threading.Thread(target=serve, daemon=True).start()


@pytest.fixture
def machine():
    """Another address of this machine (on an interface of its own) and a link-local
    listener in a network namespace of the test's own, behind a veth pair."""
    tag = uuid.uuid4().hex[:6]
    n = int(tag[:2], 16)
    dummy, veth, netns = f"ikd{tag}", f"ikv{tag}", f"ikns{tag}"
    other = f"10.213.{n}.1"
    link_host, link_far = f"169.254.{n}.1", f"169.254.{n}.2"
    stop = threading.Event()
    try:
        # A veth pair (not every kernel has the dummy module) holding another address of the machine.
        sh("ip", "link", "add", dummy, "type", "veth", "peer", "name", f"{dummy}p")
        sh("ip", "addr", "add", f"{other}/32", "dev", dummy)
        sh("ip", "link", "set", dummy, "up")
        sh("ip", "link", "set", f"{dummy}p", "up")
        sh("ip", "netns", "add", netns)
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", f"{veth}p")
        sh("ip", "link", "set", f"{veth}p", "netns", netns)
        sh("ip", "addr", "add", f"{link_host}/30", "dev", veth)
        sh("ip", "link", "set", veth, "up")
        sh("ip", "netns", "exec", netns, "ip", "addr", "add", f"{link_far}/30", "dev", f"{veth}p")
        sh("ip", "netns", "exec", netns, "ip", "link", "set", f"{veth}p", "up")
        sh("ip", "netns", "exec", netns, "ip", "link", "set", "lo", "up")
        ports = {"loopback": free_port(), "other": free_port(), "allowed": free_port(), "link_local": free_port()}
        listen("127.0.0.1", ports["loopback"], stop)
        listen(other, ports["other"], stop)
        listen(other, ports["allowed"], stop)
        listen(link_far, ports["link_local"], stop, netns=netns)
        yield {"other": other, "link_local": link_far, "ports": ports}
    finally:
        stop.set()
        subprocess.run(["ip", "link", "del", dummy], capture_output=True)
        subprocess.run(["ip", "link", "del", veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)


async def probe(p, targets: dict[str, str]) -> dict[str, str]:
    template_id = await p.template_of("netprobe", PROBE)
    r = await p.resource.CreateResource(rp.CreateResourceRequest(resource=rp.Resource(
        name="probe", template_id=template_id, variables=struct(targets=[f"{k}={v}" for k, v in targets.items()]),
        integration_ids=[p.catalog.integration], storage_id=p.catalog.storage), provision=True), metadata=p.md)
    done = await p.wait(r.id, rp.RESOURCE_STATE_PROVISIONED, rp.RESOURCE_STATUS_DONE, timeout=120)
    text = log_text(await all_logs(p.executor, done.last_job_id, p.admin))
    seen = {}
    for line in text.splitlines():
        said = line.split("(local-exec): ", 1)[-1].split()
        if len(said) == 2 and said[0] in ("REACHED", "REFUSED"):
            seen[said[1]] = said[0]
    return seen, text


@pytest.mark.parametrize("network", ["isolated", "shared"])
async def test_a_job_reaches_nothing_of_the_machine_but_what_is_allowed(tmp_path, event_prefix, nats_url, machine,
                                                                        network):
    ports = machine["ports"]
    allowed = f"{machine['other']}:{ports['allowed']}"
    async with Platform(tmp_path, event_prefix, nats_url, extra_env={
            "IK_EXECUTOR_NETWORK": network, "IK_EXECUTOR_EGRESS_ALLOW": allowed}) as p:
        targets = {name: p.inner[name].target for name in ("blueprint", "workflow", "resource", "executor",
                                                            "approval")}
        targets.update({
            "nats": "127.0.0.1:" + nats_url.rsplit(":", 1)[1],
            "postgres": "127.0.0.1:5432",
            "loopback": f"127.0.0.1:{ports['loopback']}",
            "loopback-by-name": f"localhost:{ports['loopback']}",
            "other-address": f"{machine['other']}:{ports['other']}",
            "link-local": f"{machine['link_local']}:{ports['link_local']}",
            "allowed": allowed,
        })
        seen, log = await probe(p, targets)
    assert set(seen) == set(targets), log
    if network == "isolated":
        assert "network: the job's own" in log and allowed in log
        assert {k: v for k, v in seen.items() if v == "REACHED"} == {"allowed": "REACHED"}, log
    else:
        assert "network: shared with the machine" in log
        assert all(v == "REACHED" for v in seen.values()), log
