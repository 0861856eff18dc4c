"""`python -m services.common.migrate <service>`: brings the service's
database to the current schema and exits (each Kubernetes Deployment's init
container runs it; the services also migrate at start, one at a time). It
reads only the database's URL (IK_<SVC>_DATABASE_URL, else the data
directory's SQLite file): no key, no NATS, nothing written beside the schema."""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from services.common.config import SERVICES, database_url
from services.common.migrations import upgrade


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in SERVICES:
        print(f"usage: python -m services.common.migrate <{'|'.join(SERVICES)}>", file=sys.stderr)
        return 2
    service = argv[0]
    package = importlib.import_module(f"services.{service}")
    upgrade(Path(package.__file__).parent / "migrations", database_url(service, dict(os.environ)))
    print(f"{service}: schema up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
