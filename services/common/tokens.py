"""Mints a local bearer token: `python -m services.common.tokens --user U --role R`.

The token is the last line printed, so scripts can take `| tail -1`."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from services.common.auth import DEFAULT_TTL_SECONDS, Role, mint_token
from services.common.config import DEFAULT_PORTS, load_or_create_secret


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--user", default="admin")
    parser.add_argument("--role", default="admin", choices=[r.name.lower() for r in Role])
    parser.add_argument("--ttl", type=int, default=DEFAULT_TTL_SECONDS, help="seconds")
    parser.add_argument("--banner", action="store_true", help="also print where each service listens")
    args = parser.parse_args(argv)
    secret = os.environ.get("IK_AUTH_SECRET") or load_or_create_secret(
        Path(os.environ.get("IK_DATA_DIR", ".data")).resolve()
    )
    token = mint_token(secret, args.user, Role.parse(args.role), args.ttl)
    if args.banner:
        host = os.environ.get("IK_HOST", "127.0.0.1")
        print("InfraKitchen services:")
        for name, port in DEFAULT_PORTS.items():
            port = os.environ.get(f"IK_{name.upper()}_PORT", port)
            print(f"  {name:<10} {host}:{port}")
        print(f"Local {args.role} token for user {args.user!r} (send as 'authorization: Bearer <token>'):")
    print(token)


if __name__ == "__main__":
    main()
