"""`python -m services.common.migrate <service>`: brings the service's
database to the current schema and exits (a Kubernetes Job runs it before a
rollout; the services also migrate at start, one at a time)."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

from services.common.config import SERVICES, Settings
from services.common.migrations import upgrade


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in SERVICES:
        print(f"usage: python -m services.common.migrate <{'|'.join(SERVICES)}>", file=sys.stderr)
        return 2
    service = argv[0]
    package = importlib.import_module(f"services.{service}")
    upgrade(Path(package.__file__).parent / "migrations", Settings.from_env(service).database_url)
    print(f"{service}: schema up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
