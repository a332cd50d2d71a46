#!/usr/bin/env bash
# Verify against Health/Check under h2load (nghttp2, a load generator
# keystile did not write), with pre-framed request bodies, for each key
# profile of `keystile bench` (README, "Load testing"): `simple` (one
# scope), `realistic` (two scopes, a two-CIDR allowlist, a rate limit, asked
# from an allowed address) and `three-limits` (the same with three named
# limits, all named by the request), and two answers an attacker gets:
# `shed` (a forged key from an address past its failed-attempt allowance,
# 429 with the rate-limit headers) and `malformed` (a wrong checksum). A
# release `keystile serve --dev
# --workers 1` pinned to CPU 0, h2load pinned to CPU 1; for each
# concurrency (connections x streams) the steps take turns ROUNDS times
# and the medians are compared: requests per second, the ratio to
# Health/Check (of the medians, and the median of each round's), and the
# server's CPU per call from /proc/PID/stat.
#
#   cargo build --release && bash benches/verify_h2load.sh
#
# Environment: B (binary), SERVE_ARGS (more `serve` flags), N (calls per
# step, default 100000), ROUNDS
# (default 3), SHAPES (default "1x1 4x32 16x64"), STEPS (default "health
# simple realistic three-limits shed malformed"; health first).
set -euo pipefail
cd "$(dirname "$0")/.."
B="${B:-target/release/keystile}"
N="${N:-100000}"; ROUNDS="${ROUNDS:-3}"; SHAPES="${SHAPES:-1x1 4x32 16x64}"
STEPS="${STEPS:-health simple realistic three-limits shed malformed}"
command -v h2load >/dev/null || { echo "h2load is needed: apt-get install nghttp2-client" >&2; exit 1; }
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
dir="$(mktemp -d)"
taskset -c 0 "$B" serve --dev --workers 1 --listen "127.0.0.1:$port" ${SERVE_ARGS:-} >"$dir/out" 2>/dev/null &
pid=$!
trap 'kill $pid 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do [ -s "$dir/out" ] && break; sleep 0.05; done
export KEYSTILE_ADMIN_KEY="$(head -n 1 "$dir/out" | cut -d= -f2)"
export KEYSTILE_SERVER="http://127.0.0.1:$port"
big=1000000000
simple="$("$B" keys create --name bench-simple --scope read --quiet)"
realistic="$("$B" keys create --name bench-realistic --scope read,write --allow-ip 10.0.0.0/8,192.168.0.0/16 \
  --rate-limit "$big/1s" --quiet)"
three="$("$B" keys create --name bench-three-limits --scope read,write --allow-ip 10.0.0.0/8,192.168.0.0/16 \
  --limit "api=$big/1m" --limit "export=$big/1h" --limit "burst=$big/1s" --quiet)"

# Each key answers VALID to the request framed for it (h2load sees only
# HTTP statuses, so this is checked here).
for check in "$simple --scope read" "$realistic --scope read --ip 10.1.2.3" \
  "$three --scope read --ip 10.1.2.3 --limit api,export,burst"; do
  # shellcheck disable=SC2086
  "$B" verify $check --json | grep -q '"code": *"VALID"' || { echo "a bench key does not verify: $check" >&2; exit 1; }
done

python3 - "$dir" "$simple" "$realistic" "$three" <<'PY'
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
def frame(path, msg):
    open(path, "wb").write(b"\x00" + struct.pack(">I", len(msg)) + msg)
d, simple, realistic, three = sys.argv[1:5]
frame(f"{d}/health", b"")
frame(f"{d}/simple", s(1, simple) + s(3, "read"))
frame(f"{d}/realistic", s(1, realistic) + s(2, "10.1.2.3") + s(3, "read"))
frame(f"{d}/three-limits", s(1, three) + s(2, "10.1.2.3") + s(3, "read") + s(6, "api") + s(6, "export") + s(6, "burst"))
# A forged key: the simple key with another key_id (8 characters before the
# 32-character secret and the 6-character checksum) and its checksum made
# right, so it is well formed and unknown. Asked from one address, it is
# shed once that address has spent its failed-attempt allowance.
import zlib
BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
def checksum(body):
    v, out = zlib.crc32(body.encode()), ""
    for _ in range(6):
        v, out = v // 62, BASE62[v % 62] + out
    return out
id_at = len(simple) - 6 - 32 - 1 - 8
forged = simple[:id_at] + "zzzzzzzz" + simple[id_at + 8:-6]
forged += checksum(forged)
frame(f"{d}/shed", s(1, forged) + s(2, "198.51.100.7") + s(3, "read"))
# A wrong checksum: refused before the cache and the store.
malformed = forged[:-6] + ("000000" if forged[-6:] != "000000" else "000001")
frame(f"{d}/malformed", s(1, malformed) + s(3, "read"))
open(f"{d}/forged.key", "w").write(forged)
open(f"{d}/malformed.key", "w").write(malformed)
PY
# The attacker's answers are what they should be: the forged key is shed
# once its address has spent its allowance (the server's default, 20 a
# minute), and the other one is malformed.
for _ in $(seq 25); do
  answer="$("$B" verify --ip 198.51.100.7 --scope read --json - <"$dir/forged.key")"
done
grep -q '"code": *"RATE_LIMITED"' <<<"$answer" || { echo "the forged key is not shed: $answer" >&2; exit 1; }
"$B" verify --scope read --json - <"$dir/malformed.key" | grep -q '"code": *"MALFORMED"' \
  || { echo "the malformed key is not refused as malformed" >&2; exit 1; }

ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
hz="$(getconf CLK_TCK)"
results="$dir/results"
for shape in $SHAPES; do
  c="${shape%x*}"; m="${shape#*x}"
  for round in $(seq "$ROUNDS"); do
    for step in $STEPS; do
      path=/keystile.v1.Verifier/Verify; [ "$step" = health ] && path=/grpc.health.v1.Health/Check
      before="$(ticks)"
      out="$(taskset -c 1 h2load -n "$N" -c "$c" -m "$m" -H 'content-type: application/grpc' -H 'te: trailers' \
        -d "$dir/$step" "http://127.0.0.1:$port$path" 2>&1)"
      after="$(ticks)"
      rps="$(awk '/finished in/ {gsub(",", "", $4); print $4}' <<<"$out" | tr -d 'req/s')"
      failed="$(awk '/^requests:/ {print $10}' <<<"$out")"
      echo "$shape $step $rps $(( after - before )) ${failed:-0}" >>"$results"
    done
  done
done

python3 - "$results" "$N" "$hz" "$STEPS" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
n, hz = int(sys.argv[2]), int(sys.argv[3])
shapes = list(dict.fromkeys(r[0] for r in rows))
# "by round": the median of each round's ratio to the Health/Check step
# run just before it, steadier than the ratio of medians when the
# machine's speed drifts between rounds.
print(f"{'shape':<7} {'step':<13} {'median req/s':>12} {'÷ health':>9} {'by round':>9} {'CPU µs/call':>12} {'failed':>7}")
for shape in shapes:
    med = {}
    health = [float(r[2]) for r in rows if r[0] == shape and r[1] == "health"]
    for step in sys.argv[4].split():
        mine = [r for r in rows if r[0] == shape and r[1] == step]
        rps = statistics.median(float(r[2]) for r in mine)
        by_round = statistics.median(float(r[2]) / h for r, h in zip(mine, health))
        cpu = statistics.median(int(r[3]) / hz * 1e6 / n for r in mine)
        failed = sum(int(r[4]) for r in mine)
        med[step] = rps
        print(f"{shape:<7} {step:<13} {rps:>12.0f} {rps / med['health']:>9.2f} {by_round:>9.2f} {cpu:>12.1f} {failed:>7}")
PY
