#!/usr/bin/env bash
# Forged well-formed keys against a release sidecar on Redis (README,
# "Storage, cache and revocation", forged keys): `keystile bench --scenario
# forged` sends keys with random key_ids and no IP for DURATION; this prints
# how many Verify calls were made, how many Redis reads (HGET) they caused,
# and the sidecar's RSS before and after.
#
#   cargo build --release && bash benches/forged_keys.sh
#
# Environment: B (binary), DURATION (default 20s), KNOWN_KEYS (the
# sidecar's --known-keys, default 1000000; 0 shows the cost without the
# filter).
set -euo pipefail
cd "$(dirname "$0")/.."
B="${B:-target/release/keystile}"
DURATION="${DURATION:-20s}"; KNOWN_KEYS="${KNOWN_KEYS:-1000000}"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
rport="$(free_port)"; port="$(free_port)"
dir="$(mktemp -d)"
redis-server --port "$rport" --save "" --appendonly no --dir "$dir" --daemonize no >/dev/null &
rpid=$!
pepper="$(openssl rand -hex 32 2>/dev/null || python3 -c 'import secrets; print(secrets.token_hex(32))')"
trap 'kill $pid $rpid 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.05; done
KEYSTILE_PEPPER="$pepper" taskset -c 0 "$B" serve --redis-url "redis://127.0.0.1:$rport" --listen "127.0.0.1:$port" \
  --known-keys "$KNOWN_KEYS" >/dev/null 2>&1 &
pid=$!
for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
sleep 1
KEYSTILE_ADMIN_KEY="$(KEYSTILE_PEPPER="$pepper" "$B" keys bootstrap --redis-url "redis://127.0.0.1:$rport" --quiet 2>/dev/null)"
export KEYSTILE_ADMIN_KEY
hgets() { redis-cli -p "$rport" info commandstats | sed -n 's/^cmdstat_hget:calls=\([0-9]*\).*/\1/p' | tr -d '\r' | sed 's/^$/0/'; }
rss() { awk '/VmRSS/ {print $2}' "/proc/$pid/status"; }
h0="$(hgets)"; h0="${h0:-0}"; r0="$(rss)"
out="$(taskset -c 1 "$B" bench --server "http://127.0.0.1:$port" --scenario forged --duration "$DURATION" --warmup 0s --concurrency 64 2>&1)"
h1="$(hgets)"; h1="${h1:-0}"; r1="$(rss)"
echo "$out" | grep -E "^forged"
calls="$(echo "$out" | awk '/^forged/ {print $2}')"
python3 -c "
calls, reads = $calls, $h1 - $h0
print(f'{calls} forged keys, {reads} Redis reads: {reads / max(calls, 1):.4f} per request; RSS {$r0 / 1024:.1f} -> {$r1 / 1024:.1f} MiB (--known-keys $KNOWN_KEYS)')
"
