#!/usr/bin/env bash
# A Ray cluster on one machine: a head and N worker nodes, all on loopback, token auth on.
#
#   clusters/local/start.sh            # head + 2 workers, token in ~/.ray/auth_token (created if missing)
#   NUM_WORKERS=0 clusters/local/start.sh
#   streamctx submit job.yaml --address http://127.0.0.1:8265
#   clusters/local/stop.sh
#
# Settings (environment): NUM_WORKERS (2), HEAD_CPUS (2), WORKER_CPUS (1), GCS_PORT (6379),
# DASHBOARD_PORT (8265), WORKER_PORT_BASE (20000: 4 agent ports per worker), RAY_TEMP_DIR (Ray's default), RAY_AUTH_MODE (token; `disabled` only for a
# throwaway loopback test cluster), RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (the token; default file
# ~/.ray/auth_token). RAY_BIN picks the `ray` executable (default: the one on PATH); the job
# entrypoint runs `python -m streamctx`, so start this from the environment where streamctx is
# installed.
set -euo pipefail

NUM_WORKERS="${NUM_WORKERS:-2}"
HEAD_CPUS="${HEAD_CPUS:-2}"
WORKER_CPUS="${WORKER_CPUS:-1}"
GCS_PORT="${GCS_PORT:-6379}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
WORKER_PORT_BASE="${WORKER_PORT_BASE:-20000}"
RAY_BIN="${RAY_BIN:-ray}"
HOST=127.0.0.1

export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
if [[ "$RAY_AUTH_MODE" == "token" && -z "${RAY_AUTH_TOKEN:-}" && -z "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
    # Ray reads ~/.ray/auth_token when neither variable is set; create it once.
    "$RAY_BIN" get-auth-token --generate >/dev/null
fi

temp_dir_args=()
if [[ -n "${RAY_TEMP_DIR:-}" ]]; then
    temp_dir_args=(--temp-dir "$RAY_TEMP_DIR")
fi

"$RAY_BIN" start --head \
    --node-ip-address "$HOST" --port "$GCS_PORT" \
    --include-dashboard true --dashboard-host "$HOST" --dashboard-port "$DASHBOARD_PORT" \
    --num-cpus "$HEAD_CPUS" --disable-usage-stats "${temp_dir_args[@]}"

for ((i = 0; i < NUM_WORKERS; i++)); do
    # Each worker is its own raylet ("node") on the same host, so its agents need ports of their
    # own (the defaults would collide with the head's); the custom resource names the node.
    base=$((WORKER_PORT_BASE + 4 * i))
    "$RAY_BIN" start --address "$HOST:$GCS_PORT" --node-ip-address "$HOST" \
        --num-cpus "$WORKER_CPUS" --resources "{\"local_worker_$i\": 1}" --disable-usage-stats "${temp_dir_args[@]}" \
        --dashboard-agent-listen-port "$base" --dashboard-agent-grpc-port "$((base + 1))" \
        --runtime-env-agent-port "$((base + 2))" --metrics-export-port "$((base + 3))"
done

echo "Ray cluster up: head + $NUM_WORKERS worker(s); dashboard and Jobs API at http://$HOST:$DASHBOARD_PORT (auth: $RAY_AUTH_MODE)"
