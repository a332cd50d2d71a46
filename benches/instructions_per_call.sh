#!/usr/bin/env bash
# Instructions per call, counted by valgrind's callgrind (`apt-get install
# valgrind nghttp2-client`; BENCHMARKS.md, "Instructions per call"): a
# release `keystile serve --dev --workers 1 --ext-authz` runs under
# callgrind and h2load sends it, one step after another, Health/Check (the
# baseline), ext_authz Check with a cached key (the CheckRequest of
# benches/proxy_h2load.sh), Verify of the same key and Verify of
# benches/verify_h2load.sh's realistic key (scopes, allowlist, rate
# limit); with STEPS, also its `shed` (a forged key from an address past
# its failed-attempt allowance: 429 with the rate-limit headers) and
# `malformed` (a wrong checksum) answers. The counters are zeroed after a
# warm-up and read after each step.
#
# Unlike CPU time on a shared machine, the count barely moves between
# runs (within half a per cent), so two builds can be compared with one
# run each:
#
#   BIN=/tmp/before/target/release/keystile bash benches/instructions_per_call.sh
#   bash benches/instructions_per_call.sh
#
# What it does not see: time in the kernel (reads, writes) and the cost of
# cache misses, so it complements the CPU time of benches/ab_h2load.sh; it
# does not replace it. Under callgrind the server runs about fifty times
# slower, so h2load's calls queue up and every read and write carries many
# of them: the per-call figures are those of a busy server.
#
# Environment: BIN (default target/release/keystile), N (calls per step,
# default 10000), C (connections, default 4), M (streams per connection,
# default 16), STEPS (default "health check verify realistic").
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${BIN:-target/release/keystile}"; N="${N:-10000}"; C="${C:-4}"; M="${M:-16}"
STEPS="${STEPS:-health check verify realistic}"
for tool in valgrind callgrind_control callgrind_annotate h2load; do
  command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install valgrind nghttp2-client)" >&2; exit 1; }
done
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
dir="$(mktemp -d)"
port="$(free_port)"
trap 'kill "${pid:-}" 2>/dev/null; rm -rf "$dir"' EXIT
# The request bodies: the generator of benches/proxy_h2load.sh.
sed -n '/^python3 - "\$key"/,/^PY$/p' benches/proxy_h2load.sh | sed '1d;$d' >"$dir/gen.py"
valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.%p" "$BIN" serve --dev --workers 1 \
  --listen "127.0.0.1:$port" --http-listen "127.0.0.1:$(free_port)" --ext-authz \
  >"$dir/out" 2>"$dir/valgrind.log" &
pid=$!
for _ in $(seq 600); do [ -s "$dir/out" ] && break; sleep 0.1; done
[ -s "$dir/out" ] || { echo "the server did not start under valgrind:" >&2; cat "$dir/valgrind.log" >&2; exit 1; }
admin="$(head -n 1 "$dir/out" | cut -d= -f2)"
key="$(KEYSTILE_ADMIN_KEY="$admin" "$BIN" keys create --server "http://127.0.0.1:$port" \
  --name api-client --scope api:read --quiet)"
python3 "$dir/gen.py" "$key" "$dir/check" "$dir/health" "$dir/verify" >/dev/null
# The realistic key of benches/verify_h2load.sh: two scopes, a two-CIDR
# allowlist and a rate limit, asked from an allowed address.
realistic="$(KEYSTILE_ADMIN_KEY="$admin" "$BIN" keys create --server "http://127.0.0.1:$port" \
  --name bench-realistic --scope read,write --allow-ip 10.0.0.0/8,192.168.0.0/16 --rate-limit 1000000000/1s --quiet)"
# Its bodies, and the shed and malformed ones, by that script's generator
# (which also writes the same empty Health/Check body).
sed -n '/^python3 - "\$dir" "\$simple"/,/^PY$/p' benches/verify_h2load.sh | sed '1d;$d' >"$dir/profiles.py"
python3 "$dir/profiles.py" "$dir" "$realistic" "$realistic" "$realistic"
declare -A paths=([health]=grpc.health.v1.Health/Check [check]=envoy.service.auth.v3.Authorization/Check
  [verify]=keystile.v1.Verifier/Verify [realistic]=keystile.v1.Verifier/Verify
  [shed]=keystile.v1.Verifier/Verify [malformed]=keystile.v1.Verifier/Verify)
load() {  # step, calls
  local out
  out="$(h2load -n "$2" -c "$C" -m "$M" -H 'content-type: application/grpc' -H 'te: trailers' \
    -d "$dir/$1" "http://127.0.0.1:$port/${paths[$1]}")"
  grep -q "succeeded, 0 failed" <<<"$(grep '^requests:' <<<"$out")" || { echo "$out" >&2; exit 1; }
}
for step in $STEPS; do load "$step" 2000; done  # warm-up: caches, connections, allocator
callgrind_control --zero "$pid" >/dev/null 2>&1
declare -A per_call
for step in $STEPS; do
  load "$step" "$N"
  callgrind_control --dump="$step" "$pid" >/dev/null 2>&1
  file="$(ls -t "$dir"/callgrind."$pid".* | head -n 1)"
  total="$(callgrind_annotate "$file" | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')"
  per_call[$step]=$(( total / N ))
  rm "$file"
  printf '%-7s %7d instructions per call\n' "$step" "${per_call[$step]}"
done
if [ -n "${per_call[health]:-}" ]; then
  for step in $STEPS; do
    [ "$step" = health ] && continue
    python3 -c "print(f'Health ÷ $step: {${per_call[health]} / ${per_call[$step]}:.3f}')"
  done
fi
