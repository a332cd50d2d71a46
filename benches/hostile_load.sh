#!/usr/bin/env bash
# Hostile load against a release sidecar on Redis, default settings
# (README, "Memory budget" and "Limits"; BENCHMARKS.md, "Hostile load"):
#
# 1. Forged well-formed keys for DURATION each with no IP, a random IPv4,
#    a random IPv6 and a random IPv4 with a port per request: calls, Redis
#    reads (HGET) per call, RSS before and after.
# 2. `h2load -c 50 -m 1000` for FLOOD seconds on Health/Check, then on
#    Verify with a cached key, while a second caller verifies at 200 calls/s
#    on a connection of its own: the second caller's p50/p99 and errors,
#    the calls the flood had refused (RESOURCE_EXHAUSTED), peak RSS.
#
#   cargo build --release && bash benches/hostile_load.sh
#
# The sidecar runs on CPU 0, the load on CPU 1. Environment: B (binary),
# DURATION (default 10s), FLOOD (default 10).
set -euo pipefail
cd "$(dirname "$0")/.."
B="${B:-target/release/keystile}"
DURATION="${DURATION:-10s}"; FLOOD="${FLOOD:-10}"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
rport="$(free_port)"; port="$(free_port)"; mport="$(free_port)"
dir="$(mktemp -d)"
redis-server --port "$rport" --save "" --appendonly no --dir "$dir" --daemonize no >/dev/null &
rpid=$!
pepper="$(python3 -c 'import secrets; print(secrets.token_hex(32))')"
pid=""
trap 'kill $pid $rpid 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.05; done
KEYSTILE_PEPPER="$pepper" taskset -c 0 "$B" serve --redis-url "redis://127.0.0.1:$rport" --listen "127.0.0.1:$port" \
  --metrics-listen "127.0.0.1:$mport" ${SERVE_ARGS:-} >/dev/null 2>&1 &
pid=$!
for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
sleep 1
KEYSTILE_ADMIN_KEY="$(KEYSTILE_PEPPER="$pepper" "$B" keys bootstrap --redis-url "redis://127.0.0.1:$rport" --quiet 2>/dev/null)"
export KEYSTILE_ADMIN_KEY
server="http://127.0.0.1:$port"
hgets() { redis-cli -p "$rport" info commandstats | sed -n 's/^cmdstat_hget:calls=\([0-9]*\).*/\1/p' | tr -d '\r'; }
rss() { awk '/VmRSS/ {print $2}' "/proc/$pid/status"; }
peak() { awk '/VmHWM/ {print $2}' "/proc/$pid/status"; }
metric() { curl -s "http://127.0.0.1:$mport/metrics" | awk -v m="$1" '$1 == m {print $2}' | head -n 1; }
mib() { python3 -c "print(f'{$1 / 1024:.1f}')"; }

if [ -z "${SKIP_FORGED:-}" ]; then
echo "== 1. forged keys, $DURATION each, concurrency 64"
for ip in none random-v4 random-v6 random-port; do
  h0="$(hgets)"; r0="$(rss)"
  out="$(taskset -c 1 "$B" bench --server "$server" --scenario forged --forged-ip "$ip" --duration "$DURATION" \
    --warmup 0s --concurrency 64 2>&1 | grep -E '^forged')"
  h1="$(hgets)"; r1="$(rss)"
  calls="$(awk '{print $2}' <<<"$out")"
  python3 -c "
calls, reads = $calls, ${h1:-0} - ${h0:-0}
print(f'ip {\"$ip\":<12} {calls:>9} forged keys  {reads:>4} Redis reads ({reads / max(calls, 1):.5f} per call)  RSS $(mib "$r0") -> $(mib "$r1") MiB')"
done

fi
key="$("$B" keys create --server "$server" --name flood-victim --scope read --quiet)"
python3 - "$key" "$dir/health" "$dir/verify" <<'PY'
import struct, sys
def varint(n):
    out = b""
    while True:
        b, n = n & 0x7F, n >> 7
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out
def s(num, text):
    return varint(num << 3 | 2) + varint(len(text)) + text.encode()
open(sys.argv[2], "wb").write(b"\x00" + struct.pack(">I", 0))
verify = s(1, sys.argv[1]) + s(3, "read")
open(sys.argv[3], "wb").write(b"\x00" + struct.pack(">I", len(verify)) + verify)
PY

echo "== 2. h2load -c 50 -m 1000 for ${FLOOD}s, a second caller at 200 Verify/s on its own connection"
for target in "Health grpc.health.v1.Health/Check $dir/health" "Verify keystile.v1.Verifier/Verify $dir/verify"; do
  set -- $target
  refused0="$(metric keystile_calls_refused_total)"; refused0="${refused0:-0}"
  taskset -c 1 nice -n 19 h2load -D "$FLOOD" -c 50 -m 1000 -H 'content-type: application/grpc' -H 'te: trailers' -d "$3" \
    "$server/$2" >"$dir/h2load.out" 2>&1 &
  flood=$!
  sleep 1
  second="$(taskset -c 1 "$B" bench --server "$server" --scenario hit --rate 200 --connections 1 --concurrency 8 \
    --duration "$((FLOOD - 3))s" --warmup 0s --keys 1 2>&1 | grep -E '^hit ')"
  wait "$flood" || true
  refused1="$(metric keystile_calls_refused_total)"; refused1="${refused1:-0}"
  echo "flood on $1: $(grep -E 'requests:' "$dir/h2load.out" | head -n 1 | sed 's/^ *//')"
  echo "  refused by the in-flight cap: $(python3 -c "print(int(float('$refused1') - float('$refused0')))") calls"
  echo "  second caller: $second"
  echo "  RSS now $(mib "$(rss)") MiB, peak $(mib "$(peak)") MiB"
done
