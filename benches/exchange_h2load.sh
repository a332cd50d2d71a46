#!/usr/bin/env bash
# Exchange throughput over gRPC (README, "Token exchange"), driven by h2load
# (nghttp2, `apt-get install nghttp2-client`): a release `keystile serve
# --dev --workers 1` on CPU 0, h2load on CPU 1, every request exchanging the
# same key (signing a new token each time). Prints h2load's summary and the
# server CPU per exchange from /proc/PID/stat.
#
#   cargo build --release && bash benches/exchange_h2load.sh
#
# Environment: B (binary), N (requests, default 20000), C (connections,
# default 4), M (streams per connection, default 16).
set -euo pipefail
cd "$(dirname "$0")/.."
B="${B:-target/release/keystile}"
N="${N:-20000}"; C="${C:-4}"; M="${M:-16}"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
out="$(mktemp)"; body="$(mktemp)"
taskset -c 0 "$B" serve --dev --workers 1 --listen "127.0.0.1:$port" --failed-attempts-per-minute 0 >"$out" 2>/dev/null &
pid=$!
trap 'kill $pid 2>/dev/null; rm -f "$out" "$body"' EXIT
for _ in $(seq 100); do [ -s "$out" ] && break; sleep 0.05; done
export KEYSTILE_ADMIN_KEY="$(head -n 1 "$out" | cut -d= -f2)"
key="$("$B" keys create --server "http://127.0.0.1:$port" --name exchanger --scope token:exchange,read --quiet)"
# The gRPC frame: uncompressed, length, ExchangeRequest { secret = 1 }.
python3 - "$key" "$body" <<'PY'
import struct, sys
key = sys.argv[1].encode()
msg = b"\x0a" + bytes([len(key)]) + key
open(sys.argv[2], "wb").write(b"\x00" + struct.pack(">I", len(msg)) + msg)
PY
before="$(awk '{print $14 + $15}' "/proc/$pid/stat")"
taskset -c 1 h2load -n "$N" -c "$C" -m "$M" -d "$body" \
  -H 'content-type: application/grpc' -H 'te: trailers' \
  "http://127.0.0.1:$port/keystile.v1.TokenExchange/Exchange" | grep -E "finished in|requests:|status codes"
after="$(awk '{print $14 + $15}' "/proc/$pid/stat")"
python3 -c "print(f'server CPU per exchange: {($after - $before) / $(getconf CLK_TCK) * 1e6 / $N:.1f} µs')"
