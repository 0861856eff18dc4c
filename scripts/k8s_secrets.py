"""Makes every Secret the Kubernetes manifests (deploy/kubernetes/base) read,
as files and a kustomization that generates them:

    python scripts/k8s_secrets.py --out deploy/kubernetes/overlays/mine/secrets \\
        --database-url 'postgresql://ik:PASSWORD@db.example.com:5432/ik_{service}'

then list `secrets` among the resources of your overlay (`kubectl apply -k`).

- ik-auth: `secret`, the key of local tokens (HS256);
- ik-encryption: one Fernet key per service (its secrets at rest);
- ik-service-keys: each service's Ed25519 key (`<svc>.key`) and every public
  key (`<svc>.pub`): calls between services and signed events;
- ik-nats-identities: each service's NATS nkey seed (`<svc>.nk`); and
  ik-nats-authorization: `authorization.conf`, the NATS nodes' users and
  permissions. The operators' own seed (admin.nk, every right) is made beside
  them and stays on this disk: it is in no Secret;
- ik-databases: each service's database URL, `{service}` in --database-url
  replaced by the service's name (left out without --database-url: then it
  is yours to make).

Files are made once (mode 600, their directory 700) and kept: running it again
changes nothing, so the keys stay those the cluster has. Rotate a key by
removing its file and applying again (see docs/architecture.md for what
each rotation means). Keep the directory out of version control."""
from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

from cryptography.fernet import Fernet

from services.common.config import SERVICES, load_or_create_secret
from services.common.identities import ServiceIdentity
from services.common.nats_identities import authorization, ensure, seed_file


def make(out: Path, database_url: str = "", prefix: str = "") -> dict[str, dict[str, str]]:
    """Writes the files and kustomization.yaml; returns each Secret's keys and
    the files they come from (relative to `out`)."""
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    for part in ("auth", "encryption", "service-keys", "nats-identities", "nats-authorization", "databases"):
        (out / part).mkdir(exist_ok=True, mode=0o700)
    generated: dict[str, dict[str, str]] = {}
    load_or_create_secret(out / "auth", "secret", lambda: secrets.token_hex(32))
    generated["ik-auth"] = {"secret": "auth/secret"}
    for service in SERVICES:
        load_or_create_secret(out / "encryption", service, lambda: Fernet.generate_key().decode())
    generated["ik-encryption"] = {s: f"encryption/{s}" for s in SERVICES}
    keys = out / "service-keys"
    for service in SERVICES:
        ServiceIdentity.from_settings(service, {"IK_SERVICE_KEYS_DIR": str(keys)}, out)
    generated["ik-service-keys"] = {**{f"{s}.key": f"service-keys/{s}.key" for s in SERVICES},
                                    **{f"{s}.pub": f"service-keys/{s}.pub" for s in SERVICES}}
    publics = ensure(out / "nats-identities")
    generated["ik-nats-identities"] = {f"{s}.nk": f"nats-identities/{seed_file(Path(), s).name}" for s in SERVICES}
    conf = out / "nats-authorization" / "authorization.conf"
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # derived from the seeds: written each time
    with os.fdopen(fd, "w") as f:
        f.write(authorization(publics, prefix))
    generated["ik-nats-authorization"] = {"authorization.conf": "nats-authorization/authorization.conf"}
    if database_url:
        for service in SERVICES:
            load_or_create_secret(out / "databases", service, lambda s=service: database_url.replace("{service}", s))
        generated["ik-databases"] = {s: f"databases/{s}" for s in SERVICES}
    lines = ["# Made by scripts/k8s_secrets.py: every Secret deploy/kubernetes/base reads.",
             "apiVersion: kustomize.config.k8s.io/v1beta1", "kind: Kustomization",
             "# The Deployments name the Secrets as they are: no hash suffix.",
             "generatorOptions:", "  disableNameSuffixHash: true", "secretGenerator:"]
    for name, files in generated.items():
        lines += [f"  - name: {name}", "    files:"] + [f"      - {key}={path}" for key, path in files.items()]
    (out / "kustomization.yaml").write_text("\n".join(lines) + "\n")
    return generated


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the directory to make them in (kept)")
    parser.add_argument("--database-url", default="",
                        help="each service's database URL, with {service} for the service's name")
    parser.add_argument("--prefix", default="", help="the services' IK_EVENT_PREFIX (empty in the base)")
    args = parser.parse_args(argv)
    if args.database_url and "{service}" not in args.database_url:
        parser.error("--database-url needs {service}: each service has a database of its own")
    generated = make(args.out, args.database_url, args.prefix)
    print(f"{len(generated)} Secrets in {args.out}/kustomization.yaml: {', '.join(generated)}")
    if "ik-databases" not in generated:
        print("ik-databases is yours to make (or run again with --database-url)")
    print(f"the operators' NATS seed: {args.out / 'nats-identities' / 'admin.nk'} (in no Secret)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
