"""A provider network mirror for tests: a directory served over HTTPS on
loopback (certificate of a test CA), logging every request, built from the
packages `make install` put into the development mirror (the null provider,
the test cloud's)."""
from __future__ import annotations

import os
import ssl
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.support.certs import make_certificates
from tests.testcloud import build

NULL = "registry.terraform.io/hashicorp/null"
TESTCLOUD = f"{build.HOST}/{build.NAMESPACE}/{build.TYPE}"


def development_mirror() -> Path:
    """The filesystem mirror `make install` lays out (IK_TERRAFORM_PROVIDER_MIRROR)."""
    from services.executor.adapters.terraform import _venv_plugin_dir
    mirror = os.environ.get("IK_TERRAFORM_PROVIDER_MIRROR") or _venv_plugin_dir()
    assert mirror and Path(mirror, TESTCLOUD).is_dir(), "run `make install`: the provider mirror is missing"
    return Path(mirror)


def null_files() -> dict[str, tuple[bytes, int]]:
    folder = development_mirror() / NULL / "2.1.2" / build.TARGET
    return {p.name: (p.read_bytes(), 0o755) for p in folder.iterdir() if p.is_file()}


def cloud_provider_files() -> dict[str, tuple[bytes, int]]:
    archive = development_mirror() / TESTCLOUD / f"terraform-provider-{build.TYPE}_{build.VERSION}_{build.TARGET}.zip"
    return build.files_of_zip(archive)


class ProviderMirror:
    """`root` served at https://127.0.0.1:<port>/ ; `requests` lists the paths asked for."""

    def __init__(self, root: Path, certs_dir: Path):
        self.root = root
        self.certs = make_certificates(certs_dir)
        self.requests: list[str] = []
        mirror = self

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - the http.server naming
                mirror.requests.append(self.path)
                super().do_GET()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.server.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.certs["cert"], self.certs["key"])
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.url = f"https://127.0.0.1:{self.port}/"
        self._thread = threading.Thread(target=self.server.serve_forever, name="provider-mirror", daemon=True)

    def add(self, address: str, version: str, files: dict[str, tuple[bytes, int]]) -> Path:
        return build.add_package(self.root, address, version, files)

    def downloads(self) -> list[str]:
        """The package archives fetched so far."""
        return [p for p in self.requests if p.endswith(".zip")]

    def executor_env(self) -> dict[str, str]:
        """An executor taking its providers from this mirror only (and its cache)."""
        return {"IK_TERRAFORM_PROVIDER_MIRROR": self.url, "IK_TERRAFORM_PROVIDER_DIRECT": "off",
                "IK_EXECUTOR_EXTRA_CA_FILE": str(self.certs["ca"]),
                "IK_EXECUTOR_EGRESS_ALLOW": f"127.0.0.1:{self.port}"}

    def __enter__(self) -> "ProviderMirror":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
