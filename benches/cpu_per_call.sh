#!/usr/bin/env bash
# Server CPU per call (from /proc/PID/stat, steadier than requests per
# second on a shared machine): a release `keystile serve --dev --workers 1`
# pinned to CPU 0, `keystile bench` pinned to CPU 1, one scenario at a time.
#
#   cargo build --release && bash benches/cpu_per_call.sh
#
# Environment: B (binary), DURATION (default 5s), CONCURRENCY (default 32),
# CONNECTIONS (default 4).
set -euo pipefail
cd "$(dirname "$0")/.."
B="${B:-target/release/keystile}"
DURATION="${DURATION:-5s}"
CONCURRENCY="${CONCURRENCY:-32}"
CONNECTIONS="${CONNECTIONS:-4}"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
out="$(mktemp)"
taskset -c 0 "$B" serve --dev --workers 1 --listen "127.0.0.1:$port" >"$out" 2>/dev/null &
pid=$!
trap 'kill $pid 2>/dev/null; rm -f "$out"' EXIT
for _ in $(seq 100); do [ -s "$out" ] && break; sleep 0.05; done
key="$(head -n 1 "$out" | cut -d= -f2)"
ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
hz="$(getconf CLK_TCK)"
for run in "health simple" "hit simple" "hit realistic" "hit three-limits" "malformed simple"; do
  set -- $run
  before="$(ticks)"
  line="$(KEYSTILE_ADMIN_KEY="$key" taskset -c 1 "$B" bench --server "http://127.0.0.1:$port" --scenario "$1" \
    --profile "$2" --duration "$DURATION" --warmup 500ms --concurrency "$CONCURRENCY" --connections "$CONNECTIONS" \
    --keys 200 | grep -E "^$1 ")"
  after="$(ticks)"
  requests="$(awk '{print $2}' <<<"$line")"
  python3 - "$1/$2" "$requests" "$before" "$after" "$hz" "$line" <<'PY'
import sys
name, n, before, after, hz, line = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
cpu = (after - before) / hz
rps = line.split("req/s")[0].split()[-1]
print(f"{name:<18} {n:>8} calls  {rps:>7} req/s  server CPU {cpu*1e6/max(n,1):6.1f} µs/call")
PY
done
