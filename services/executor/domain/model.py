"""The executor's model: jobs and what they run with (integrations, secrets,
storages). Pure Python: no grpc, sqlalchemy or nats."""
from __future__ import annotations

import datetime as dt
import io
import json
import re
import zipfile
from dataclasses import dataclass, field
from typing import Any

MASK = "***"

# Job actions and statuses, in the product's words.
PLAN, APPLY, DESTROY = "plan", "apply", "destroy"
ACTIONS = (PLAN, APPLY, DESTROY)

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, TIMED_OUT = (
    "queued", "running", "succeeded", "failed", "cancelled", "timed_out")
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED, TIMED_OUT})
# Every status before the end. A job in one of these holds what it names (its
# integrations, secrets and storage); each status is in exactly one of the two
# sets (a unit test keeps it so), so no new status slips past that check.
NOT_ENDED = (QUEUED, RUNNING)

# Integration providers and how their credentials become environment variables.
AWS, AZURE, GCP, GENERIC, OIDC = "aws", "azure", "gcp", "generic", "oidc"
_PROVIDER_PREFIX = {AWS: "AWS_", AZURE: "ARM_", GCP: "GOOGLE_", GENERIC: "", OIDC: ""}

TF_VAR, ENV = "tf_var", "env"  # how a secret's keys reach terraform

LOCAL, PG = "local", "pg"  # storage kinds

_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_STATE_PATH_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")


@dataclass(frozen=True)
class Source:
    repository_url: str
    ref: str
    path: str = ""


@dataclass(frozen=True)
class Correlation:
    resource_id: str = ""
    resource_revision: int = 0
    workflow_id: str = ""
    step_id: str = ""
    temporary_state_id: str = ""
    template_id: str = ""


@dataclass(frozen=True)
class Output:
    name: str
    value: Any
    sensitive: bool = False

    def masked(self) -> "Output":
        return Output(self.name, MASK, True) if self.sensitive else self


@dataclass(frozen=True)
class PlanSummary:
    add: int = 0
    change: int = 0
    destroy: int = 0
    resource_changes: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # The state the plan was made against (serial 0 and no lineage: no state
    # yet); its saved plan applies only to that state, never to a later one.
    state_serial: int = 0
    state_lineage: str = ""


@dataclass
class Job:
    id: str
    action: str
    source: Source
    variables: dict[str, Any]
    sensitive_variables: list[str]
    integration_ids: list[str]
    secret_ids: list[str]
    storage_id: str
    state_path: str
    correlation: Correlation
    plan_job_id: str = ""
    timeout_seconds: float = 0.0
    status: str = QUEUED
    commit: str = ""
    outputs: list[Output] = field(default_factory=list)
    plan_summary: PlanSummary | None = None
    exit_code: int = 0
    error_message: str = ""
    attempt: int = 0
    worker: str = ""
    lease_until: dt.datetime | None = None
    cancel_requested: bool = False
    creator: str = ""
    create_time: dt.datetime | None = None
    start_time: dt.datetime | None = None
    end_time: dt.datetime | None = None
    queue_reason: str = ""  # why a queued job waits (an integration at its cap)
    # The service that submitted the job for its user ("" when the user called
    # SubmitJob): only the resource service's word makes the correlation a fact
    # (a job's OIDC token names its resource only then).
    via: str = ""

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL

    def masked_variables(self) -> dict[str, Any]:
        return {k: (MASK if k in self.sensitive_variables else v) for k, v in self.variables.items()}


@dataclass
class Integration:
    id: str
    name: str
    description: str
    provider: str
    credentials: dict[str, str]
    creator: str = ""
    create_time: dt.datetime | None = None
    update_time: dt.datetime | None = None
    version: int = 1
    max_concurrent_jobs: int = 0  # 0: no cap
    # OIDC integrations: how jobs federate (services/executor/adapters/oidc.py),
    # the OidcFederation message's fields; not secret.
    oidc: dict[str, str] = field(default_factory=dict)

    @property
    def etag(self) -> str:
        return f'"{self.version}"'


@dataclass
class Secret:
    id: str
    name: str
    description: str
    exposure: str
    values: dict[str, str]
    creator: str = ""
    create_time: dt.datetime | None = None
    update_time: dt.datetime | None = None
    version: int = 1

    @property
    def etag(self) -> str:
        return f'"{self.version}"'


@dataclass
class Storage:
    id: str
    name: str
    kind: str
    local_directory: str = ""
    pg_connection_string: str = ""
    pg_schema: str = ""
    creator: str = ""
    create_time: dt.datetime | None = None
    version: int = 1

    @property
    def etag(self) -> str:
        return f'"{self.version}"'


@dataclass(frozen=True)
class StatePathClaim:
    storage_id: str
    state_path: str
    resource_id: str
    create_time: dt.datetime | None = None


@dataclass(frozen=True)
class JobLease:
    """Who runs a job, as the database says: enough to tell whether a
    working directory of it can still belong to a live run."""
    status: str
    attempt: int
    worker: str
    lease_until: dt.datetime | None


def workdir_left_behind(lease: JobLease | None, attempt: int | None, now: dt.datetime, this_worker: str) -> bool:
    """Whether a job's working directory, made by its run `attempt` (None:
    a directory named without its attempt, by an earlier version), is what a
    run that died left behind and may be removed, when no run of this
    process uses it.

    Executor replicas on one machine may share the work root (it is under
    the data directory, or IK_EXECUTOR_WORK_DIR), so a directory can belong
    to another replica's live run: such a run holds its job `running`, as
    its latest attempt, with a lease it keeps renewing. Everything else is left behind: a queued job
    has no run (a run's directory is gone before its job is handed back), an
    ended job's run is over, an earlier attempt lost the job, a lease that
    ran out means its runner died, and a job recorded on this worker id runs
    nowhere else (the caller runs none of it). A job the database does not
    know is not this deployment's: it is left alone."""
    if lease is None:
        return False
    if lease.status != RUNNING:
        return True
    if attempt is not None and attempt < lease.attempt:
        return True
    if lease.worker == this_worker:
        return True
    return lease.lease_until is None or lease.lease_until < now


def valid_env_name(name: str) -> bool:
    return bool(_ENV_NAME_RE.match(name))


def valid_state_path(path: str) -> bool:
    """Relative, no '..' segments, no empty segments: a state path can never
    point outside its storage."""
    return bool(_STATE_PATH_RE.match(path)) and ".." not in path.split("/") and len(path) <= 512


# Environment variables that change how terraform, a shell or the dynamic
# linker runs (or where they look for code and configuration): a secret or an
# integration may not set them, or a writer could turn a job into something
# else (LD_PRELOAD, TF_CLI_CONFIG_FILE with a provider override, PATH, ...).
PROTECTED_ENV = frozenset({
    "PATH", "HOME", "SHELL", "ENV", "BASH_ENV", "CDPATH", "IFS", "PS4", "TMPDIR", "PWD", "USER", "LOGNAME",
    "TF_CLI_CONFIG_FILE", "TF_DATA_DIR", "TF_WORKSPACE", "TF_INPUT", "TF_IN_AUTOMATION", "TF_IGNORE",
    "TF_REGISTRY_DISCOVERY_RETRY", "TF_REGISTRY_CLIENT_TIMEOUT", "CHECKPOINT_DISABLE", "SSL_CERT_FILE",
    "SSL_CERT_DIR", "TERRAFORM_CONFIG",
    # What changes how the shell and the C library's tools run (nsenter, which enters a job's network, sees
    # the job's environment; the namespace's own set-up runs with an empty one).
    "SHELLOPTS", "BASHOPTS", "GLOBIGNORE", "LOCPATH", "NLSPATH", "HOSTALIASES", "RES_OPTIONS", "LOCALDOMAIN"})
PROTECTED_ENV_PREFIXES = ("LD_", "DYLD_", "TF_CLI_", "TF_PLUGIN_", "TF_LOG", "TF_REATTACH", "TF_SKIP_",
                          "BASH_FUNC_", "PYTHON", "GIT_", "GCONV_", "MALLOC_")


def protected_env_name(name: str) -> str | None:
    """Why an environment variable may not be set by a job's credentials, or None."""
    upper = name.upper()
    if upper in PROTECTED_ENV or upper.startswith(PROTECTED_ENV_PREFIXES):
        return (f"{name} changes how terraform, the shell or the dynamic linker runs; a job's credentials "
                "may not set it")
    return None


def integration_env(provider: str, credentials: dict[str, str]) -> dict[str, str]:
    """AWS {'access_key_id': ..} -> {'AWS_ACCESS_KEY_ID': ..}; keys already
    carrying the provider's prefix, and generic keys, are exported as given."""
    prefix = _PROVIDER_PREFIX[provider]
    env = {}
    for key, value in credentials.items():
        name = key if not prefix or key.upper().startswith(prefix) else prefix + key
        env[name.upper() if prefix else name] = value
    return env


def secret_env(exposure: str, values: dict[str, str]) -> dict[str, str]:
    return {(f"TF_VAR_{k}" if exposure == TF_VAR else k): v for k, v in values.items()}


class Redactor:
    """Replaces every secret value in a text with ***. Longer values first, so
    a secret containing another is hidden whole."""

    def __init__(self, values=()):
        self._values: list[str] = []
        self.add(values)

    def add(self, values) -> None:
        for value in values:
            text = value if isinstance(value, str) else str(value)
            # Very short values (e.g. "1") would blank out ordinary text; they
            # are still kept out of responses and events by masking.
            if len(text) >= 3 and text not in self._values:
                self._values.append(text)
        self._values.sort(key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for value in self._values:
            if value in text:
                text = text.replace(value, MASK)
        return text


def sensitive_values(value: Any) -> list[str]:
    """Every scalar inside a (possibly nested) sensitive value, as text."""
    if isinstance(value, dict):
        return [s for v in value.values() for s in sensitive_values(v)]
    if isinstance(value, list):
        return [s for v in value for s in sensitive_values(v)]
    if value is None:
        return []
    return [value if isinstance(value, str) else str(value)]


def state_meta(state_json: str | bytes) -> tuple[int, str]:
    """(serial, lineage) of a terraform state file's text; (0, "") for none.
    Nothing else of the state is read: it may hold sensitive values."""
    try:
        state = json.loads(state_json) if state_json and state_json.strip() else {}
    except ValueError:
        return 0, ""
    if not isinstance(state, dict):
        return 0, ""
    return int(state.get("serial") or 0), str(state.get("lineage") or "")


def plan_state_meta(plan_file: bytes) -> tuple[int, str]:
    """(serial, lineage) of the state a saved plan was made against: the
    plan file is a zip archive holding that state as `tfstate`."""
    try:
        with zipfile.ZipFile(io.BytesIO(plan_file)) as z:
            return state_meta(z.read("tfstate"))
    except (zipfile.BadZipFile, KeyError):
        return 0, ""


def stale_plan_reason(planned: tuple[int, str], current: tuple[int, str]) -> str:
    """Why a saved plan no longer fits the state, or "" when it does. A plan
    made against no state fits only no state: terraform itself lets such a
    plan through against any later state, which would apply it twice."""
    if planned == current:
        return ""
    if planned[1] and current[1] and planned[1] != current[1]:
        return "the state was replaced since the plan (another lineage)"
    return f"the state moved since the plan (serial {planned[0]}, now {current[0]})"


def plan_summary_from_json(plan: dict[str, Any]) -> PlanSummary:
    """Counts of `terraform show -json <planfile>`, as `terraform plan` prints them."""
    add = change = destroy = 0
    changes = []
    for rc in plan.get("resource_changes") or []:
        actions = tuple(rc.get("change", {}).get("actions") or ())
        if actions == ("no-op",) or actions == ("read",):
            continue
        changes.append((rc.get("address", ""), actions))
        if "create" in actions:
            add += 1
        if "delete" in actions:
            destroy += 1
        if actions == ("update",):
            change += 1
    return PlanSummary(add, change, destroy, tuple(changes))


def cap_reason(job_integrations: list[str], caps: dict[str, tuple[str, int]], running: list[list[str]]) -> str:
    """Why the job must wait, or "": an integration it uses (id -> (name,
    cap); 0: no cap) already has `cap` running jobs (`running`: the
    integration ids of each running job but this one)."""
    for id_ in job_integrations:
        name, cap = caps.get(id_, ("", 0))
        if cap and (busy := sum(1 for used in running if id_ in used)) >= cap:
            return f"integration {name or id_} runs {busy} of at most {cap} jobs at once; waiting for one to end"
    return ""
