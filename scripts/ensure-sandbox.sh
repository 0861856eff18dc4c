#!/usr/bin/env bash
# Makes sure bubblewrap (bwrap) is installed: the executor runs every
# terraform command of a job inside it and refuses to start without it
# (unless IK_EXECUTOR_SANDBOX=off, for development only).
set -euo pipefail
if command -v bwrap >/dev/null 2>&1; then
  exit 0
fi
echo "installing bubblewrap (Debian package)"
sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
$sudo_cmd apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq bubblewrap
