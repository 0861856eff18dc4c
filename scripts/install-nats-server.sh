#!/usr/bin/env bash
# Installs Debian's nats-server when it is missing; prints its path.
set -euo pipefail
if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ]; then
  echo "installing nats-server (Debian package)" >&2
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq nats-server >&2
fi
command -v nats-server || echo /usr/sbin/nats-server
