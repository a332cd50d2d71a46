#!/usr/bin/env bash
# Fleet-wide limits against local ones (README, "Rate limits"): one release
# `keystile serve --workers 1` on a real Redis, pinned to CPU 0, loaded by
# `keystile bench` on CPU 1 with one hot key (the realistic profile: two
# scopes, an allowlist and a rate limit far above the load, so every
# Verify is admitted and counted). For each mode: throughput, server CPU
# per call (/proc/PID/stat) and the Redis commands the run caused per
# 1,000 verifies (INFO commandstats, the harness's own INFO calls left out).
#
#   cargo build --release && bash benches/fleet_limits.sh
#
# Environment: B (binary), DURATION (default 5s), CONCURRENCY (default 32).
set -euo pipefail
cd "$(dirname "$0")/.."
B="${B:-target/release/keystile}"
DURATION="${DURATION:-5s}"
CONCURRENCY="${CONCURRENCY:-32}"
PEPPER=4444444444444444444444444444444444444444444444444444444444444444
free() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
rport="$(free)"
dir="$(mktemp -d)"
redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" >/dev/null &
rpid=$!
pid=""
trap 'kill $rpid $pid 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.05; done
url="redis://127.0.0.1:$rport"
admin="$(KEYSTILE_PEPPER=$PEPPER "$B" keys bootstrap --redis-url "$url" | cut -d= -f2)"
commands() {
  redis-cli -p "$rport" info commandstats | awk -F'[:=,]' '/^cmdstat_/ && $1 != "cmdstat_info" {n += $3} END {print n}'
}
hz="$(getconf CLK_TCK)"
printf '%-7s %9s %9s %14s %22s\n' mode calls req/s "CPU µs/call" "Redis cmds/1000 verify"
for mode in fleet local; do
  port="$(free)"
  flags=()
  [ "$mode" = local ] && flags=(--local-limits)
  KEYSTILE_PEPPER=$PEPPER taskset -c 0 "$B" serve --redis-url "$url" --workers 1 --listen "127.0.0.1:$port" \
    "${flags[@]}" 2>/dev/null &
  pid=$!
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
  sleep 1
  before_ticks="$(awk '{print $14 + $15}' "/proc/$pid/stat")"
  before_cmds="$(commands)"
  line="$(KEYSTILE_ADMIN_KEY="$admin" taskset -c 1 "$B" bench --server "http://127.0.0.1:$port" --scenario hit \
    --profile realistic --keys 1 --duration "$DURATION" --warmup 1s --concurrency "$CONCURRENCY" | grep -E '^hit ')"
  after_ticks="$(awk '{print $14 + $15}' "/proc/$pid/stat")"
  after_cmds="$(commands)"
  [ -n "${SHOW_COMMANDS:-}" ] && redis-cli -p "$rport" info commandstats | grep -v "^#" >&2
  kill "$pid"; wait "$pid" 2>/dev/null || true
  python3 - "$mode" "$line" "$before_ticks" "$after_ticks" "$hz" "$before_cmds" "$after_cmds" <<'PY'
import sys
mode, line = sys.argv[1], sys.argv[2]
b, a, hz, cb, ca = (int(x) for x in sys.argv[3:8])
n = int(line.split()[1])
rps = line.split("req/s")[0].split()[-1]
# The warmup's and key creation's commands are in the count too: an upper bound.
print(f"{mode:<7} {n:>9} {rps:>9} {(a - b) / hz * 1e6 / max(n, 1):>14.1f} {(ca - cb) * 1000 / max(n, 1):>22.2f}")
PY
done
