#!/usr/bin/env bash
# The images' base, made from Debian's packages alone (no image registry):
# Debian 12 "bookworm", minbase (dpkg, apt), Python 3.11 and CA certificates,
# without documentation, man pages, locales or glibc's iconv modules (Python
# has its own codecs), imported into podman as
# localhost/ik-debian:bookworm. Rebuilt only when missing (`make images-clean`
# drops it). Usage: scripts/debian-base.sh [image name]
set -euo pipefail
image=${1:-localhost/ik-debian:bookworm}
if podman image exists "$image"; then
  exit 0
fi
mirror=${IK_DEBIAN_MIRROR:-http://deb.debian.org/debian}
echo "making $image from $mirror (Debian packages; about 30 s)"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
mmdebstrap --quiet --variant=minbase --include=python3,ca-certificates \
  --aptopt='APT::Install-Recommends "false"' \
  --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --dpkgopt='path-exclude=/usr/lib/x86_64-linux-gnu/gconv/*' \
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
  bookworm - "$mirror" 2>"$log" \
  | podman import --change 'CMD ["python3"]' --change 'ENV LANG=C.UTF-8' - "$image" >/dev/null \
  || { tail -n 40 "$log" >&2; exit 1; }
