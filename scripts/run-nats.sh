#!/usr/bin/env bash
# The NATS server of `make run`: JetStream, and only the platform's NATS
# identities (services.common.nats_identities): each service logs in as
# itself with its nkey seed from the data directory, anonymous clients are
# refused. Started in the background once; its URL is written to
# $IK_DATA_DIR/nats.url for the services.
#
# A NATS that answers on the port already and is not this one (say, a
# developer's own, without authentication) is left alone: the platform's
# server starts beside it on the next free port, and this says so.
set -euo pipefail
host=${NATS_HOST:-127.0.0.1}
port=${NATS_PORT:-4222}
data=${IK_DATA_DIR:-$PWD/.data}
py=${PY:-.venv/bin/python}

listening() { (exec 3<>"/dev/tcp/$host/$1") 2>/dev/null; }
ours() { [ -f "$data/nats.pid" ] && kill -0 "$(cat "$data/nats.pid")" 2>/dev/null \
           && grep -q "nats-run.conf" "/proc/$(cat "$data/nats.pid")/cmdline" 2>/dev/null; }

mkdir -p "$data/nats"
if ours; then
  echo "the platform's NATS (with identities) already runs: $(cat "$data/nats.url")"
  exit 0
fi
server=$("$(dirname "$0")/install-nats-server.sh")
if listening "$port"; then
  echo "NOTE: another NATS server (not the platform's, maybe without authentication) listens on $host:$port;"
  echo "      it is left alone. The platform starts its own, authenticated one beside it."
  while listening "$port"; do port=$((port + 1)); done
fi
"$py" -m services.common.nats_identities --directory "$data/nats-identities" --prefix "${IK_EVENT_PREFIX:-}" \
  --out "$data/nats-authorization.conf"
umask 077
cat > "$data/nats-run.conf" <<CONF
listen: "$host:$port"
jetstream { store_dir: "$data/nats" }
include "nats-authorization.conf"
CONF
echo "starting $server on $host:$port with JetStream and the platform's NATS identities (store $data/nats, log $data/nats.log)"
nohup "$server" -c "$data/nats-run.conf" >"$data/nats.log" 2>&1 &
echo $! > "$data/nats.pid"
echo "nats://$host:$port" > "$data/nats.url"
for _ in $(seq 1 50); do
  listening "$port" && exit 0
  sleep 0.2
done
echo "nats-server did not start; see $data/nats.log" >&2
exit 1
