"""Where a job's terraform gets its providers: registries, the operator's
mirror, and the machine's shared cache.

Each job's `terraform init` runs with a CLI configuration of its own
(TF_CLI_CONFIG_FILE, written here into the job's directory) whose
`provider_installation` block lists, in order:

1. the machine's provider cache (a filesystem mirror, unpacked layout,
   mounted read-only in the sandbox: terraform links a cached package into
   the job instead of fetching it);
2. the operator's mirror, when set (IK_TERRAFORM_PROVIDER_MIRROR): a
   directory (filesystem mirror; its providers come from there only) or an
   https URL (a provider network mirror);
3. the providers' own registries (`direct`), unless
   IK_TERRAFORM_PROVIDER_DIRECT=off.

Terraform takes the newest version any of them offers that the module's
constraints (and lock file) allow, from the first one that has it.

The cache is written only by the executor, never from inside a sandbox. Each
job's terraform keeps its providers in a data directory the executor makes
empty for the job (TF_DATA_DIR), never the module's own `.terraform` (a
repository could ship one holding any binary, with a lock file vouching for
it): so what `init` leaves there, terraform installed in this run, from the
cache, the operator's mirror or a registry, checked against the registry's
signatures or the mirror's checksums and the lock file. Right after `init`,
before any module code runs, the packages it downloaded (real directories,
not links into the cache) are copied into the cache (regular files only),
hashed as copied, and renamed into place when that `h1:` is one the lock file
records: concurrent jobs never see half a package, and of two jobs harvesting
the same package the first stays. A provider's address names its origin
(`host/namespace/type`), so a module that asks for a provider from a host of
its own choosing fills the cache only under that address. Terraform's own
plugin_cache_dir is not used: it is not safe with concurrent inits, and it
would be written from inside the sandbox.

A lock file (`.terraform.lock.hcl`) that records other hashes for a cached
version (e.g. one made on another platform, with no `h1:` for this one)
keeps that provider out of the cache for the job: terraform fetches it and
checks the lock's `zh:` hashes, as it would without a cache.
"""
from __future__ import annotations

import base64
import hashlib
import logging
import os
import platform
import re
import shutil
import stat
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger(__name__)

LOCK_FILE = ".terraform.lock.hcl"
MAX_LOCK_BYTES = 256 * 1024  # a lock file names providers and their hashes: far below this
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
PLATFORM = f"{platform.system().lower()}_{_ARCH.get(platform.machine().lower(), platform.machine().lower())}"
SYSTEM_CA_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt",
                     "/etc/ssl/cert.pem")
# A provider address in a lock file or the providers directory: host/namespace/type.
_ADDRESS = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]+)?/[A-Za-z0-9_-]+/[A-Za-z0-9_-]+$")
_VERSION = re.compile(r"^[0-9A-Za-z.+-]{1,64}$")
_LOCK_BLOCK = re.compile(r'provider\s+"([^"]+)"\s*\{(.*?)\n\}', re.S)
_LOCK_VERSION = re.compile(r'^\s*version\s*=\s*"([^"]+)"', re.M)
_LOCK_HASHES = re.compile(r"hashes\s*=\s*\[(.*?)\]", re.S)
_QUOTED = re.compile(r'"([^"]+)"')


class ProviderSettingsError(ValueError):
    """The operator's provider settings cannot work: the executor does not start."""


@dataclass(frozen=True)
class Locked:
    version: str
    hashes: frozenset[str]


def parse_lock(text: str) -> dict[str, Locked]:
    """The providers a lock file records: address -> version and hashes
    (the subset of HCL terraform writes there; comment lines are dropped)."""
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith(("#", "//")))
    out = {}
    for address, body in _LOCK_BLOCK.findall(text):
        version = _LOCK_VERSION.search(body)
        hashes = _LOCK_HASHES.search(body)
        if version and _ADDRESS.match(address):
            out[address] = Locked(version.group(1), frozenset(_QUOTED.findall(hashes.group(1)) if hashes else ()))
    return out


def read_lock(module: Path) -> str:
    """The module's lock file ("" when it has none). Not followed when it
    is a link, never more than MAX_LOCK_BYTES (module code may have written it)."""
    path = module / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return ""
    except OSError as exc:
        raise ValueError(f"{LOCK_FILE} cannot be read: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{LOCK_FILE} is not a regular file")
        data = f.read(MAX_LOCK_BYTES + 1)
    if len(data) > MAX_LOCK_BYTES:
        raise ValueError(f"{LOCK_FILE} is larger than {MAX_LOCK_BYTES // 1024} KiB")
    return data.decode("utf-8", errors="replace")


def hash1(digests: dict[str, str]) -> str:
    """Terraform's `h1:` hash (Go's dirhash.Hash1) of a package's files: name -> sha256 hex."""
    summary = "".join(f"{digests[name]}  {name}\n" for name in sorted(digests))
    return "h1:" + base64.b64encode(hashlib.sha256(summary.encode()).digest()).decode()


def hash1_of_dir(directory: Path) -> str:
    """The `h1:` hash of an unpacked package (regular files; a link refuses it)."""
    digests = {}
    for path in directory.rglob("*"):
        if path.is_symlink():
            raise ValueError(f"a package holds a link ({path.name[:100]})")
        if path.is_file():
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            digests[path.relative_to(directory).as_posix()] = digest.hexdigest()
    return hash1(digests)


def providers_in(mirror: Path) -> list[str]:
    """The provider addresses a filesystem mirror holds (packed or unpacked layout)."""
    found = []
    for type_dir in sorted(mirror.glob("*/*/*")):
        address = type_dir.relative_to(mirror).as_posix()
        if type_dir.is_dir() and _ADDRESS.match(address) and any(type_dir.iterdir()):
            found.append(address)
    return found


@dataclass(frozen=True)
class ProviderCache:
    """The machine's provider cache: <root>/providers (a filesystem mirror,
    unpacked layout) and <root>/hashes (the h1 of each cached package)."""
    root: Path

    @property
    def mirror(self) -> Path:
        return self.root / "providers"

    def _hash_file(self, address: str, version: str) -> Path:
        return self.root / "hashes" / address / version / PLATFORM

    def ensure(self) -> None:
        self.mirror.mkdir(parents=True, exist_ok=True)
        (self.root / "hashes").mkdir(parents=True, exist_ok=True)
        self.sweep()

    def cached_hash(self, address: str, version: str) -> str:
        """The h1 of a cached package ("" when none is cached). A package
        whose hash was never written (the executor died right after renaming
        it into place) is hashed now, and its hash written."""
        hash_file = self._hash_file(address, version)
        try:
            return hash_file.read_text().strip()
        except OSError:
            pass
        package = self.mirror / address / version / PLATFORM
        if not package.is_dir() or package.is_symlink():
            return ""
        try:
            h1 = hash1_of_dir(package)
            self._record_hash(address, version, h1)
            return h1
        except (OSError, ValueError):
            return ""

    def _record_hash(self, address: str, version: str, h1: str) -> None:
        """Writes a cached package's h1 whole (a new file renamed into place)."""
        hash_file = self._hash_file(address, version)
        hash_file.parent.mkdir(parents=True, exist_ok=True)
        written = hash_file.with_name(f".{hash_file.name}.{uuid.uuid4().hex}")
        written.write_text(h1 + "\n")
        os.replace(written, hash_file)

    def not_for(self, locked: dict[str, Locked]) -> list[str]:
        """Providers whose locked version is cached as a package the lock
        does not record: terraform fetches them for this job instead."""
        return sorted(address for address, lock in locked.items()
                      if (h1 := self.cached_hash(address, lock.version)) and h1 not in lock.hashes)

    def harvest(self, providers: Path, locked: dict[str, Locked]) -> list[str]:
        """Copies the packages `init` downloaded (into `providers`, the
        providers folder of the job's TF_DATA_DIR, which the executor made
        empty before init) into the cache; returns "address version" of each
        one added. Runs in the executor before any module code ran in the
        job. A package is copied first, then hashed as copied (regular files
        only, nothing followed), and renamed into place only when its hash
        is one the lock file records."""
        added = []
        for address, version, package in _packages(providers):
            lock = locked.get(address)
            target = self.mirror / address / version / PLATFORM
            if lock is None or lock.version != version or target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.parent / f".{PLATFORM}.{uuid.uuid4().hex}.partial"
            try:
                _copy_regular(package, partial)
                h1 = hash1_of_dir(partial)
                if h1 not in lock.hashes:
                    log.warning("provider %s %s not cached: its package is not the one the lock file records",
                                address, version)
                    continue
                try:
                    os.rename(partial, target)  # atomic; fails when another job put it there first
                except OSError:
                    continue
                self._record_hash(address, version, h1)
                added.append(f"{address} {version}")
            except (OSError, ValueError) as exc:
                log.warning("provider %s %s not cached: %s", address, version, exc)
            finally:
                shutil.rmtree(partial, ignore_errors=True)
        return added

    def sweep(self, older_than: float = 3600.0) -> None:
        """Removes copies a killed executor left half done (any executor
        sharing the cache may be copying one now: only old ones go)."""
        now = time.time()
        for partial in self.mirror.rglob(".*.partial"):
            try:
                if now - partial.lstat().st_mtime > older_than:
                    shutil.rmtree(partial, ignore_errors=True)
            except OSError:
                pass


def _subdirs(folder: Path):
    """Real subdirectories (links are not followed)."""
    try:
        with os.scandir(folder) as entries:
            return sorted(Path(e.path) for e in entries if e.is_dir(follow_symlinks=False))
    except OSError:
        return []


def _packages(providers: Path):
    """(address, version, package dir) of the real packages under a providers folder."""
    for host in _subdirs(providers):
        for namespace in _subdirs(host):
            for kind in _subdirs(namespace):
                for version in _subdirs(kind):
                    address = f"{host.name}/{namespace.name}/{kind.name}"
                    package = version / PLATFORM
                    if _ADDRESS.match(address) and _VERSION.match(version.name) and not package.is_symlink() \
                            and package.is_dir():
                        yield address, version.name, package


def _copy_regular(source: Path, target: Path) -> None:
    """Copies a package tree: directories and regular files only (a link or
    any other kind of file refuses the package)."""
    target.mkdir(mode=0o755)
    with os.scandir(source) as entries:
        for entry in entries:
            destination = target / entry.name
            if entry.is_dir(follow_symlinks=False):
                _copy_regular(Path(entry.path), destination)
            elif entry.is_file(follow_symlinks=False):
                fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW)
                with os.fdopen(fd, "rb") as src, open(destination, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                mode = os.stat(entry.path, follow_symlinks=False).st_mode
                destination.chmod(0o755 if mode & stat.S_IXUSR else 0o644)
            else:
                raise ValueError(f"the package holds a link or special file ({entry.name[:100]})")


@dataclass(frozen=True)
class ProviderSources:
    """The operator's choice of where providers come from (see module doc)."""
    mirror_url: str = ""
    mirror_dir: str = ""
    direct: bool = True
    cache: ProviderCache | None = None
    ca_bundle: str = ""  # the certificates jobs trust ("" = the system's)
    mirror_providers: tuple[str, ...] = field(default=())

    @classmethod
    def from_env(cls, env: dict[str, str], data_dir: Path, default_mirror: str = "") -> "ProviderSources":
        if env.get("IK_TERRAFORM_PLUGIN_DIR"):
            raise ProviderSettingsError("IK_TERRAFORM_PLUGIN_DIR is gone: set IK_TERRAFORM_PROVIDER_MIRROR to that "
                                        "directory (and IK_TERRAFORM_PROVIDER_DIRECT=off to never use a registry)")
        mirror = env.get("IK_TERRAFORM_PROVIDER_MIRROR", default_mirror).strip()
        url = directory = ""
        if mirror.startswith(("https://", "http://")):
            if not mirror.startswith("https://") or not urlparse(mirror).hostname:
                raise ProviderSettingsError("IK_TERRAFORM_PROVIDER_MIRROR: a network mirror is an https:// URL "
                                            "(terraform refuses any other)")
            url = mirror if mirror.endswith("/") else mirror + "/"
        elif mirror:
            if not os.path.isabs(mirror) or not os.path.isdir(mirror):
                raise ProviderSettingsError("IK_TERRAFORM_PROVIDER_MIRROR: neither an https:// URL nor an existing "
                                            "absolute directory")
            directory = mirror
        direct = env.get("IK_TERRAFORM_PROVIDER_DIRECT", "on").strip().lower()
        if direct not in ("on", "off"):
            raise ProviderSettingsError("IK_TERRAFORM_PROVIDER_DIRECT: on or off")
        if direct == "off" and not mirror:
            raise ProviderSettingsError("IK_TERRAFORM_PROVIDER_DIRECT=off needs IK_TERRAFORM_PROVIDER_MIRROR: "
                                        "providers must come from somewhere")
        cache_setting = env.get("IK_TERRAFORM_PROVIDER_CACHE", "").strip()
        cache = None if cache_setting == "off" else ProviderCache(
            Path(cache_setting or data_dir / "provider-cache").resolve())
        if cache is not None:
            cache.ensure()
        ca_bundle = ""
        if extra := env.get("IK_EXECUTOR_EXTRA_CA_FILE", "").strip():
            ca_bundle = str(_ca_bundle(Path(extra), data_dir))
        return cls(url, directory, direct == "on", cache, ca_bundle,
                   tuple(providers_in(Path(directory))) if directory else ())

    def readable(self) -> list[str]:
        """What the sandbox mounts read-only for terraform to install from."""
        return [p for p in (self.mirror_dir, str(self.cache.mirror) if self.cache else "", self.ca_bundle) if p]

    def environment(self, cli_config: Path) -> dict[str, str]:
        env = {"TF_CLI_CONFIG_FILE": str(cli_config)}
        if self.ca_bundle:
            env["SSL_CERT_FILE"] = self.ca_bundle
        return env

    def cli_config(self, not_from_cache: list[str] = ()) -> str:
        blocks = []
        if self.cache is not None:
            exclude = f"\n    exclude = {_hcl_list(not_from_cache)}" if not_from_cache else ""
            blocks.append(f'  filesystem_mirror {{\n    path = {_hcl_string(str(self.cache.mirror))}{exclude}\n  }}')
        if self.mirror_dir and self.mirror_providers:
            blocks.append(f"  filesystem_mirror {{\n    path = {_hcl_string(self.mirror_dir)}\n"
                          f"    include = {_hcl_list(self.mirror_providers)}\n  }}")
        if self.mirror_url:
            blocks.append(f"  network_mirror {{\n    url = {_hcl_string(self.mirror_url)}\n  }}")
        if self.direct:
            exclude = f"\n    exclude = {_hcl_list(self.mirror_providers)}" if self.mirror_providers else ""
            blocks.append(f"  direct {{{exclude}\n  }}")
        return "provider_installation {\n" + "\n".join(blocks) + "\n}\n"

    def describe(self) -> str:
        parts = ["the machine's cache"] if self.cache is not None else []
        if self.mirror_dir:
            parts.append(f"mirror {self.mirror_dir} ({', '.join(self.mirror_providers) or 'empty'})")
        if self.mirror_url:
            parts.append(f"network mirror {self.mirror_url}")
        if self.direct:
            parts.append("their registries")
        return ", then ".join(parts)


def _hcl_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("${", "$${") + '"'


def _hcl_list(values) -> str:
    return "[" + ", ".join(_hcl_string(v) for v in values) + "]"


def _ca_bundle(extra: Path, data_dir: Path) -> Path:
    """The system's certificates and the operator's extra ones in one file
    (Go reads SSL_CERT_FILE instead of the system's, not beside them)."""
    try:
        added = extra.read_bytes()
    except OSError as exc:
        raise ProviderSettingsError(f"IK_EXECUTOR_EXTRA_CA_FILE cannot be read: {exc.strerror}") from None
    if b"-----BEGIN CERTIFICATE-----" not in added:
        raise ProviderSettingsError("IK_EXECUTOR_EXTRA_CA_FILE holds no PEM certificate")
    system = next((Path(p).read_bytes() for p in SYSTEM_CA_BUNDLES if os.path.isfile(p)), b"")
    bundle = data_dir / "job-ca-bundle.pem"
    bundle.parent.mkdir(parents=True, exist_ok=True)
    partial = bundle.with_suffix(f".{uuid.uuid4().hex}.partial")
    partial.write_bytes(system.rstrip(b"\n") + b"\n" + added)
    partial.chmod(0o644)
    os.replace(partial, bundle)
    return bundle
