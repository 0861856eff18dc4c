#!/usr/bin/env bash
# Installs Debian's nats-server when it is missing; prints its path.
set -euo pipefail
if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ]; then
  "$(dirname "$0")/apt-install.sh" nats-server
fi
command -v nats-server || echo /usr/sbin/nats-server
