#!/usr/bin/env bash
# Makes sure a NATS server with JetStream answers on $NATS_HOST:$NATS_PORT.
# Uses the one already running; otherwise installs Debian's nats-server when
# missing and starts it in the background with its store under the data dir.
set -euo pipefail
host=${NATS_HOST:-127.0.0.1}
port=${NATS_PORT:-4222}
data=${IK_DATA_DIR:-$PWD/.data}

listening() { (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; }

if listening; then
  echo "NATS already listening on $host:$port"
  exit 0
fi
server=$("$(dirname "$0")/install-nats-server.sh")
mkdir -p "$data/nats"
echo "starting $server with JetStream on $host:$port (store $data/nats, log $data/nats.log)"
nohup "$server" -a "$host" -p "$port" -js -sd "$data/nats" >"$data/nats.log" 2>&1 &
echo $! > "$data/nats.pid"
for _ in $(seq 1 50); do
  listening && exit 0
  sleep 0.2
done
echo "nats-server did not start; see $data/nats.log" >&2
exit 1
