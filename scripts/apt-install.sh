#!/usr/bin/env bash
# Installs Debian packages for the Makefile's install scripts: as root, or
# through sudo without a password prompt (`sudo -n`: a CI run must fail, not
# hang). Every line goes to stderr, since callers may print a result on stdout.
# Usage: scripts/apt-install.sh PACKAGE...
set -euo pipefail
echo "installing $* (Debian packages)" >&2
sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo -n"
$sudo_cmd apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "$@" >&2
