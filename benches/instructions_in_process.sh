#!/usr/bin/env bash
# Instructions per in-process cache-hit Verify, counted by valgrind's
# callgrind (`apt-get install valgrind`; BENCHMARKS.md, "In process
# (criterion)"): the criterion benches of benches/verify.rs run under callgrind in profile
# mode, collecting only inside the engine's Verify (the poll of its future,
# `Engine::verify_with`), and the instructions of the calls criterion's
# timed loop made are divided by their number (setup calls are left out). Like
# benches/instructions_per_call.sh, the count barely moves between runs,
# where nanoseconds move by a third on a shared machine.
#
#   bash benches/instructions_in_process.sh
#
# Environment: BENCHES (default: the three cache-hit benches).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
BENCHES="${BENCHES:-verify_cache_hit_scopes_ip_limit verify_cache_hit_scopes_ip_no_limit verify_cache_hit_scopes_ip_fleet_lease}"
cargo bench --bench verify --no-run 2>/dev/null
bin="$(cargo bench --bench verify --no-run --message-format=json 2>/dev/null |
  python3 -c 'import sys,json
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="verify" and m.get("executable"): print(m["executable"])')"
dir="$(mktemp -d)"; trap 'rm -rf "$dir"' EXIT
for bench in $BENCHES; do
  valgrind --tool=callgrind --callgrind-out-file="$dir/cg" --toggle-collect='keystile::engine::Engine::verify_with::{{closure}}' \
    "$bin" --bench --profile-time 2 "^$bench\$" >/dev/null 2>&1
  callgrind_annotate --tree=caller "$dir/cg" 2>/dev/null | BENCH="$bench" python3 -c '
import os, re, sys
for line in sys.stdin:
    m = re.match(r"\s*([\d,]+) .*< \S*criterion::bencher::AsyncBencher\S* \(([\d,]+)x\)", line)
    if m:
        ir, n = (int(g.replace(",", "")) for g in m.groups())
        name = os.environ["BENCH"]
        print(f"{name:<42} {ir / n:>6.0f} instructions per verify ({n} calls)")
        break
else:
    sys.exit(os.environ["BENCH"] + ": no Verify call from the timed loop was counted (was Engine::verify_with inlined?)")'
done
