#!/usr/bin/env bash
# The images' base, made from Debian's packages alone (no image registry):
# Debian 12 "bookworm", minbase (dpkg, apt), Python 3.11 and CA certificates,
# without documentation, man pages, locales or glibc's iconv modules (Python
# has its own codecs), imported into podman as
# localhost/ik-debian:bookworm. Usage: scripts/debian-base.sh [image name]
#
# Its packages come from bookworm, bookworm-updates and bookworm-security. It
# is made again once a week (IK_BASE_MAX_AGE_DAYS), so the images built on it
# pick up Debian's security updates (podman's layer cache would keep them
# otherwise): every layer above it is then rebuilt.
set -euo pipefail
image=${1:-localhost/ik-debian:bookworm}
max_age_days=${IK_BASE_MAX_AGE_DAYS:-7}
if podman image exists "$image"; then
  created=$(podman image inspect --format '{{.Created.Unix}}' "$image")
  if [ $(( $(date +%s) - created )) -lt $(( max_age_days * 86400 )) ]; then
    exit 0
  fi
  echo "$image is older than $max_age_days days: making it again (Debian's updates)"
fi
mirror=${IK_DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${IK_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
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
  --dpkgopt='path-exclude=/usr/lib/*-linux-gnu*/gconv/*' \
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
  bookworm - "deb $mirror bookworm main" "deb $mirror bookworm-updates main" \
  "deb $security bookworm-security main" 2>"$log" \
  | podman import --change 'CMD ["python3"]' --change 'ENV LANG=C.UTF-8' - "$image" >/dev/null \
  || { tail -n 40 "$log" >&2; exit 1; }
