"""Builds the test cloud's provider into a provider mirror (`make install`
runs it): `python -m tests.testcloud.build <mirror dir>`.

The package is a zip, as registries ship providers: the executable
`terraform-provider-testcloud_v<version>` (a shell script starting
python3.11), the provider's module and its packages (`site/`, from PyPI,
for this machine's Python). The directory it writes serves both ways an
operator mirrors providers:

- a filesystem mirror, packed layout: <host>/<ns>/<type>/terraform-provider-<type>_<version>_<target>.zip
- a network mirror (the provider network mirror protocol): beside the zips,
  <host>/<ns>/<type>/index.json and <version>.json with the archives' hashes
  (`h1:` over the files, `zh:` over the zip), served as static files.

Hashes are computed here the way Terraform does (h1 = Go's dirhash Hash1),
so a lock file recorded from this mirror verifies.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from services.executor.adapters import providers

HOST, NAMESPACE, TYPE = "infrakitchen.test", "ik", "testcloud"
VERSION = "0.1.0"
TARGET = "linux_amd64"
TF_PACKAGE = "tf==1.2.0"
HERE = Path(__file__).resolve().parent
LAUNCHER = """#!/bin/sh
# The test cloud's provider (tests/testcloud): Python with its packages beside it.
here=$(dirname "$0")
for py in /usr/bin/python3.11 /usr/local/bin/python3.11 python3.11 python3; do
  if command -v "$py" >/dev/null 2>&1; then exec "$py" -I -S -B "$here/testcloud_provider.py" "$@"; fi
done
echo "the testcloud provider needs python3.11" >&2
exit 1
"""


def hash1(files: dict[str, bytes]) -> str:
    """Terraform's `h1:` over name -> content (the executor's own computation)."""
    return providers.hash1({name: hashlib.sha256(content).hexdigest() for name, content in files.items()})


def zip_hash(path: Path) -> str:
    return "zh:" + hashlib.sha256(path.read_bytes()).hexdigest()


def package_files(work: Path) -> dict[str, tuple[bytes, int]]:
    """name -> (content, mode) of the provider package."""
    site = work / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    "--no-compile", "--no-warn-conflicts", "--target", str(site), TF_PACKAGE], check=True)
    for junk in site.glob("*.dist-info"):
        shutil.rmtree(junk)
    shutil.rmtree(site / "bin", ignore_errors=True)
    files = {f"terraform-provider-{TYPE}_v{VERSION}": (LAUNCHER.encode(), 0o755),
             "testcloud_provider.py": ((HERE / "provider" / "testcloud_provider.py").read_bytes(), 0o644),
             "testcloud_client.py": ((HERE / "provider" / "testcloud_client.py").read_bytes(), 0o644)}
    for path in sorted(site.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            mode = 0o755 if path.stat().st_mode & stat.S_IXUSR else 0o644
            files[path.relative_to(work).as_posix()] = (path.read_bytes(), mode)
    return files


def write_zip(path: Path, files: dict[str, tuple[bytes, int]]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(files):
            content, mode = files[name]
            info = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))
            info.external_attr = (stat.S_IFREG | mode) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, content)


def add_package(mirror: Path, address: str, version: str, files: dict[str, tuple[bytes, int]]) -> Path:
    """Writes one provider package into `mirror` (both layouts, see above)
    and adds its version to the network mirror's index; returns the zip."""
    folder = mirror / address
    folder.mkdir(parents=True, exist_ok=True)
    kind = address.rsplit("/", 1)[1]
    archive = folder / f"terraform-provider-{kind}_{version}_{TARGET}.zip"
    partial = folder / f".{archive.name}.partial"
    write_zip(partial, files)
    os.replace(partial, archive)
    h1 = hash1({name: content for name, (content, _) in files.items()})
    index = folder / "index.json"
    versions = json.loads(index.read_text())["versions"] if index.exists() else {}
    index.write_text(json.dumps({"versions": {**versions, version: {}}}, indent=2))
    (folder / f"{version}.json").write_text(json.dumps({"archives": {TARGET: {
        "url": archive.name, "hashes": [h1, zip_hash(archive)]}}}, indent=2))
    return archive


def files_of_zip(archive: Path) -> dict[str, tuple[bytes, int]]:
    """A package's files (to repackage it, e.g. as another version)."""
    with zipfile.ZipFile(archive) as zf:
        return {info.filename: (zf.read(info), (info.external_attr >> 16) & 0o777 or 0o644)
                for info in zf.infolist() if not info.is_dir()}


def build(mirror: Path) -> Path:
    """Writes the test cloud's package and the mirror's index into `mirror`; returns the zip."""
    with tempfile.TemporaryDirectory() as tmp:
        return add_package(mirror, f"{HOST}/{NAMESPACE}/{TYPE}", VERSION, package_files(Path(tmp)))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m tests.testcloud.build <mirror dir>")
    print(build(Path(sys.argv[1])))
