#!/usr/bin/env bash
# Makes sure what `make images` needs is installed, from Debian's packages:
# podman (builds and runs the images without a daemon), runc (crun, podman's
# default runtime on Debian 12, refuses machines whose cgroups are in hybrid
# mode) and mmdebstrap (makes the base image from Debian's packages where no
# image registry is reachable).
set -euo pipefail
missing=()
command -v podman >/dev/null 2>&1 || missing+=(podman)
command -v runc >/dev/null 2>&1 || [ -x /usr/sbin/runc ] || missing+=(runc)
command -v mmdebstrap >/dev/null 2>&1 || missing+=(mmdebstrap)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
"$(dirname "$0")/apt-install.sh" "${missing[@]}" uidmap
