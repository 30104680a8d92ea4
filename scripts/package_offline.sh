#!/usr/bin/env bash
# `sls package` with no AWS account: osls asks CloudFormation describeStacks for every layer (to
# skip re-uploading an unchanged one), so a moto server on 127.0.0.1 answers it ("no such stack").
# Every AWS endpoint points at that server and the credentials are dummies, so nothing can reach
# AWS even where real credentials are set. Arguments go to `sls package` (--stage, --region,
# --param="arch=arm64", --package DIR ...).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SLS=${SLS:-node_modules/.bin/sls}

port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=$(mktemp -t cai-moto.XXXXXX)
"$PY" -m moto.server -H 127.0.0.1 -p "$port" >"$log" 2>&1 &
moto_pid=$!
trap 'kill "$moto_pid" 2>/dev/null; wait "$moto_pid" 2>/dev/null; rm -f "$log"' EXIT

# moto imports for a second or two before it listens
for _ in $(seq 100); do
  if "$PY" -c "import socket, sys; socket.create_connection(('127.0.0.1', $port), 0.2)" 2>/dev/null; then
    break
  fi
  kill -0 "$moto_pid" 2>/dev/null || { cat "$log" >&2; echo "moto server did not start" >&2; exit 1; }
  sleep 0.1
done

unset AWS_PROFILE AWS_SESSION_TOKEN AWS_DEFAULT_PROFILE
export AWS_ENDPOINT_URL="http://127.0.0.1:$port"
export AWS_ENDPOINT_URL_CLOUDFORMATION="$AWS_ENDPOINT_URL"
export AWS_ACCESS_KEY_ID=offline AWS_SECRET_ACCESS_KEY=offline
export SLS_TELEMETRY_DISABLED=1 SLS_NOTIFICATIONS_MODE=off
"$SLS" package "$@"
