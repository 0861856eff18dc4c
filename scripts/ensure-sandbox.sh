#!/usr/bin/env bash
# Makes sure what a job's sandbox needs is installed: bubblewrap (bwrap; the
# executor runs every terraform command of a job inside it) and, for the job's
# own network, pasta (Debian's passt), nftables, iproute2 and util-linux's
# unshare and setpriv. The executor refuses to start without them unless
# IK_EXECUTOR_SANDBOX=off or IK_EXECUTOR_NETWORK=shared (development only).
set -euo pipefail
missing=()
command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)
command -v pasta >/dev/null 2>&1 || missing+=(passt)
command -v nft >/dev/null 2>&1 || [ -x /usr/sbin/nft ] || missing+=(nftables)
command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || missing+=(iproute2)
command -v setpriv >/dev/null 2>&1 || missing+=(util-linux)
# pasta opens the TUN device inside the job's user namespace, as the executor's
# user: Debian makes /dev/net/tun 0666 (udev's static node); a machine without
# udev may have left it 0600, which only root can use (an executor in a
# container runs as uid 10001).
if [ -c /dev/net/tun ] && [ "$(stat -c %a /dev/net/tun)" != 666 ] && [ "$(id -u)" -eq 0 ]; then
  echo "making /dev/net/tun usable by every user (0666, as Debian's udev does)"
  chmod 0666 /dev/net/tun
fi
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
"$(dirname "$0")/apt-install.sh" "${missing[@]}"
