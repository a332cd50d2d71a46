#!/usr/bin/env bash
# Two builds side by side under h2load (nghttp2, `apt-get install
# nghttp2-client`; BENCHMARKS.md, "A Check as cheap as a Verify"): a
# `keystile serve --dev --workers 1 --ext-authz` of each binary, both on
# CPU 0, h2load on CPU 1. Every step of each build takes its turn in every
# round, so a noisy minute falls on both: Health/Check (the baseline),
# ext_authz Check with a cached key (the CheckRequest of
# benches/proxy_h2load.sh) and Verify of the same key.
#
#   git worktree add /tmp/before <rev> && (cd /tmp/before && cargo build --release)
#   A=/tmp/before/target/release/keystile B=target/release/keystile bash benches/ab_h2load.sh
#
# (Build the other revision in its own target directory: cargo's artifacts
# for two checkouts of one crate in one directory overwrite each other.)
#
# Prints, per build and step, the medians of requests per second and of
# server CPU per call (/proc/PID/stat), then Check ÷ Health per round.
# Environment: A, B (binaries), N (requests per step, default 30000), C
# (connections, default 4), M (streams per connection, default 16), ROUNDS
# (default 9).
set -euo pipefail
cd "$(dirname "$0")/.."
A="${A:?the first binary}"; B="${B:?the second binary}"
N="${N:-30000}"; C="${C:-4}"; M="${M:-16}"; ROUNDS="${ROUNDS:-9}"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
dir="$(mktemp -d)"
declare -A BIN=([a]="$A" [b]="$B") PORT PID
trap 'kill ${PID[a]:-} ${PID[b]:-} 2>/dev/null; rm -rf "$dir"' EXIT
# The request bodies: the generator of benches/proxy_h2load.sh.
sed -n '/^python3 - "\$key"/,/^PY$/p' benches/proxy_h2load.sh | sed '1d;$d' >"$dir/gen.py"
for x in a b; do
  PORT[$x]="$(free_port)"
  taskset -c 0 "${BIN[$x]}" serve --dev --workers 1 --listen "127.0.0.1:${PORT[$x]}" \
    --http-listen "127.0.0.1:$(free_port)" --ext-authz --failed-attempts-per-minute 0 >"$dir/out.$x" 2>/dev/null &
  PID[$x]=$!
  for _ in $(seq 100); do [ -s "$dir/out.$x" ] && break; sleep 0.05; done
  admin="$(head -n 1 "$dir/out.$x" | cut -d= -f2)"
  key="$(KEYSTILE_ADMIN_KEY="$admin" "${BIN[$x]}" keys create --server "http://127.0.0.1:${PORT[$x]}" \
    --name api-client --scope api:read --quiet)"
  python3 "$dir/gen.py" "$key" "$dir/check.$x" "$dir/health.$x" "$dir/verify.$x" >/dev/null
done
step() {  # build, step name, gRPC path
  local x="$1" name="$2" path="$3" before after rps
  before="$(awk '{print $14 + $15}' "/proc/${PID[$x]}/stat")"
  rps="$(taskset -c 1 h2load -n "$N" -c "$C" -m "$M" -H 'content-type: application/grpc' -H 'te: trailers' \
    -d "$dir/$name.$x" "http://127.0.0.1:${PORT[$x]}/$path" | awk '/finished in/ {gsub(",", "", $4); print $4}')"
  after="$(awk '{print $14 + $15}' "/proc/${PID[$x]}/stat")"
  echo "$x $name ${rps%req/s} $(( after - before ))" >>"$dir/results"
}
declare -A paths
paths=([health]=grpc.health.v1.Health/Check [check]=envoy.service.auth.v3.Authorization/Check
  [verify]=keystile.v1.Verifier/Verify)
for x in a b; do step "$x" health "${paths[health]}"; step "$x" check "${paths[check]}"; done
: >"$dir/results"  # the warm-up is not counted
for round in $(seq "$ROUNDS"); do
  echo "round $round of $ROUNDS" >&2
  for name in health check verify; do
    for x in a b; do step "$x" "$name" "${paths[$name]}"; done
  done
done
python3 - "$dir/results" "$N" "$(getconf CLK_TCK)" "$A" "$B" <<'PY'
import statistics as st, sys
path, n, tck, a, b = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
data = {}
for line in open(path):
    x, name, rps, ticks = line.split()
    data.setdefault((x, name), []).append((float(rps), int(ticks) / tck * 1e6 / n))
for x, binary in (("a", a), ("b", b)):
    print(f"{x}: {binary}")
    for name in ("health", "check", "verify"):
        rows = data[(x, name)]
        print(f"  {name:7} median {st.median(r for r, _ in rows):8.0f} req/s   server CPU per call median"
              f" {st.median(c for _, c in rows):5.1f} µs   (rounds: {', '.join(f'{c:.1f}' for _, c in rows)})")
    ratios = [c[0] / h[0] for c, h in zip(data[(x, "check")], data[(x, "health")])]
    print(f"  Check ÷ Health per round: {', '.join(f'{r:.2f}' for r in ratios)}; median {st.median(ratios):.2f}")
PY
