#!/usr/bin/env bash
# `keystile bench` against a release `keystile serve --dev --workers 1`
# pinned to CPU 0, the bench pinned to CPU 1 (README, "Load testing"): for
# each step its requests per second and the server's CPU per call (bench
# --server-pid reads it from /proc, steadier than requests per second on a
# shared machine). The steps take turns ROUNDS times; medians and their
# ratio to Health/Check are printed at the end.
#
#   health       grpc.health.v1.Health/Check, the empty handler
#   simple       Verify, cached key with one scope
#   realistic    Verify, cached key: two scopes, a CIDR allowlist, a rate limit
#   three-limits Verify, the same with three named limits, all named
#   malformed    Verify, a key that fails its checksum
#   shed         Verify, forged keys from one address past its failed-attempt
#                allowance: RATE_LIMITED with the rate-limit headers
#
#   cargo build --release && bash benches/cpu_per_call.sh
#
# Environment: B (binary), SERVE_ARGS (more `serve` flags), DURATION
# (default 3s), CONCURRENCY (default 128), CONNECTIONS (default 4), ROUNDS
# (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
B="${B:-target/release/keystile}"
DURATION="${DURATION:-3s}"; CONCURRENCY="${CONCURRENCY:-128}"; CONNECTIONS="${CONNECTIONS:-4}"; ROUNDS="${ROUNDS:-3}"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
dir="$(mktemp -d)"
# shellcheck disable=SC2086
taskset -c 0 "$B" serve --dev --workers 1 --listen "127.0.0.1:$port" ${SERVE_ARGS:-} >"$dir/out" 2>/dev/null &
pid=$!
trap 'kill $pid 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do [ -s "$dir/out" ] && break; sleep 0.05; done
export KEYSTILE_ADMIN_KEY="$(head -n 1 "$dir/out" | cut -d= -f2)"
for round in $(seq "$ROUNDS"); do
  for step in "health health simple" "simple hit simple" "realistic hit realistic" "three-limits hit three-limits" \
    "malformed malformed simple" "shed forged simple --forged-ip 203.0.113.9"; do
    # shellcheck disable=SC2086
    set -- $step
    name="$1" scenario="$2" profile="$3"; shift 3
    line="$(taskset -c 1 "$B" bench --server "http://127.0.0.1:$port" --server-pid "$pid" --scenario "$scenario" \
      --profile "$profile" --duration "$DURATION" --warmup 500ms --concurrency "$CONCURRENCY" \
      --connections "$CONNECTIONS" --keys 200 "$@" --json)"
    echo "$name $line" >>"$dir/results"
    echo "round $round: $name done" >&2
  done
done
python3 - "$dir/results" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    name, doc = line.split(" ", 1)
    r = json.loads(doc)["scenarios"][0]
    rows.setdefault(name, []).append((r["rps"], r["server_cpu_us_per_call"], r["errors"]))
base_rps = statistics.median(r[0] for r in rows["health"])
base_cpu = statistics.median(r[1] for r in rows["health"])
print(f"{'step':<13} {'median req/s':>12} {'÷ health':>9} {'CPU µs/call':>12} {'health CPU ÷ it':>16} {'errors':>7}")
for name, rs in rows.items():
    rps, cpu = statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs)
    print(f"{name:<13} {rps:>12.0f} {rps / base_rps:>9.2f} {cpu:>12.1f} {base_cpu / cpu:>16.2f} {sum(r[2] for r in rs):>7}")
PY
