#!/usr/bin/env bash
# The proxy front ends under h2load (nghttp2, `apt-get install
# nghttp2-client`; README, "Protect an API without code"): a release
# `keystile serve --dev --workers 1 --ext-authz --http-listen` on CPU 0,
# h2load on CPU 1.
#
#   1. gRPC Health/Check: the same server's empty handler, the baseline;
#   2. ext_authz Check with a cached key: a CheckRequest as Envoy sends it
#      (source address, method, host, path and 12 headers, the key in
#      `authorization`);
#   3. forward-auth GET /authz over HTTP/1.1 keep-alive, as nginx asks;
#   4. keystile.v1.Verifier/Verify of the same key, for comparison.
#
# For each: h2load's summary and the server CPU per call from
# /proc/PID/stat; at the end, Check ÷ Health in requests per second and in
# CPU per call.
#
#   cargo build --release && bash benches/proxy_h2load.sh
#
# Environment: B (binary), N (requests per step, default 20000), C
# (connections, default 4), M (streams per connection, default 16), ROUNDS
# (default 5).
set -euo pipefail
cd "$(dirname "$0")/.."
B="${B:-target/release/keystile}"
N="${N:-20000}"; C="${C:-4}"; M="${M:-16}"; ROUNDS="${ROUNDS:-5}"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port="$(free_port)"; hport="$(free_port)"
out="$(mktemp)"; check="$(mktemp)"; health="$(mktemp)"; verify="$(mktemp)"; results="$(mktemp)"
taskset -c 0 "$B" serve --dev --workers 1 --listen "127.0.0.1:$port" --http-listen "127.0.0.1:$hport" \
  --ext-authz --failed-attempts-per-minute 0 >"$out" 2>/dev/null &
pid=$!
trap 'kill $pid 2>/dev/null; rm -f "$out" "$check" "$health" "$verify" "$results"' EXIT
for _ in $(seq 100); do [ -s "$out" ] && break; sleep 0.05; done
export KEYSTILE_ADMIN_KEY="$(head -n 1 "$out" | cut -d= -f2)"
key="$("$B" keys create --server "http://127.0.0.1:$port" --name api-client --scope api:read --quiet)"

python3 - "$key" "$check" "$health" "$verify" <<'PY'
import struct, sys

def varint(n):
    out = b""
    while True:
        b, n = n & 0x7F, n >> 7
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out

def field(num, payload):  # length-delimited
    return varint(num << 3 | 2) + varint(len(payload)) + payload

def s(num, text):
    return field(num, text.encode())

key = sys.argv[1]
headers = {
    ":authority": "api.example.com", ":method": "GET", ":path": "/v1/users?page=2", ":scheme": "https",
    "accept": "application/json", "accept-encoding": "gzip, deflate, br", "authorization": f"Bearer {key}",
    "user-agent": "example-client/2.3.1 (linux; x86_64)", "x-forwarded-proto": "https",
    "x-request-id": "7d3c1f0e-9b2a-4c55-8e31-2f6a0b9d4e17", "x-envoy-expected-rq-timeout-ms": "15000",
    "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
}
entries = b"".join(field(3, s(1, k) + s(2, v)) for k, v in headers.items())
http = s(1, "7d3c1f0e-9b2a-4c55-8e31-2f6a0b9d4e17") + s(2, "GET") + entries + s(4, "/v1/users?page=2") \
    + s(5, "api.example.com") + s(6, "https") + s(10, "HTTP/2")
socket_address = s(2, "203.0.113.9") + varint(3 << 3) + varint(41000)
source = field(1, field(1, socket_address))
attributes = field(1, source) + field(4, field(2, http))
msg = field(1, attributes)
open(sys.argv[2], "wb").write(b"\x00" + struct.pack(">I", len(msg)) + msg)
open(sys.argv[3], "wb").write(b"\x00" + struct.pack(">I", 0))
verify = s(1, key) + s(2, "203.0.113.9") + s(3, "api:read")
open(sys.argv[4], "wb").write(b"\x00" + struct.pack(">I", len(verify)) + verify)
print(f"CheckRequest: {len(msg)} bytes")
PY

run() {  # name, then h2load arguments
  local name="$1"; shift
  local before after
  before="$(awk '{print $14 + $15}' "/proc/$pid/stat")"
  taskset -c 1 h2load "$@" | tee /dev/stderr | awk -v name="$name" '/finished in/ {gsub(",", "", $4); print name, $4}' >>"$results"
  after="$(awk '{print $14 + $15}' "/proc/$pid/stat")"
  python3 -c "print('$name', $(( after - before )) / $(getconf CLK_TCK) * 1e6 / $N)" >>"$results"
  echo
}
grpc=(-n "$N" -c "$C" -m "$M" -H 'content-type: application/grpc' -H 'te: trailers')
# The machine's noise drifts over seconds: the steps take turns, ROUNDS
# times, and the medians are compared.
for round in $(seq "$ROUNDS"); do
  echo "== round $round: 1. grpc.health.v1.Health/Check (baseline)"
  run health "${grpc[@]}" -d "$health" "http://127.0.0.1:$port/grpc.health.v1.Health/Check" 2>&1 | grep -E "finished in|status codes" || true
  echo "== round $round: 2. envoy.service.auth.v3.Authorization/Check, cached key"
  run check "${grpc[@]}" -d "$check" "http://127.0.0.1:$port/envoy.service.auth.v3.Authorization/Check" 2>&1 | grep -E "finished in|status codes" || true
  echo "== round $round: 3. forward-auth GET /authz, HTTP/1.1 keep-alive"
  run authz --h1 -n "$N" -c "$C" -H "x-api-key: $key" -H 'x-original-uri: /v1/users' -H 'x-original-method: GET' \
    -H 'x-forwarded-host: api.example.com' "http://127.0.0.1:$hport/authz" 2>&1 | grep -E "finished in|status codes" || true
  echo "== round $round: 4. keystile.v1.Verifier/Verify, cached key (for comparison)"
  run verify "${grpc[@]}" -d "$verify" "http://127.0.0.1:$port/keystile.v1.Verifier/Verify" 2>&1 | grep -E "finished in|status codes" || true
done

python3 - "$results" <<'PY'
import statistics, sys
rps, cpu = {}, {}
lines = [l.split() for l in open(sys.argv[1])]
# Each step leaves two lines: its req/s, then its CPU per call.
for (name, r), (_, c) in zip(lines[0::2], lines[1::2]):
    rps.setdefault(name, []).append(float(r.replace("req/s", "")))
    cpu.setdefault(name, []).append(float(c))
for name in rps:
    print(f"{name:7} median {statistics.median(rps[name]):>8.0f} req/s (rounds: {', '.join(f'{x:.0f}' for x in rps[name])})"
          f"   server CPU per call median {statistics.median(cpu[name]):5.1f} µs")
ratios = [c / h for c, h in zip(rps["check"], rps["health"])]
print(f"Check ÷ Health per round: {', '.join(f'{x:.2f}' for x in ratios)}; median {statistics.median(ratios):.2f}")
vr = [v / h for v, h in zip(rps["verify"], rps["health"])]
print(f"Verify ÷ Health per round: {', '.join(f'{x:.2f}' for x in vr)}; median {statistics.median(vr):.2f}")
PY
