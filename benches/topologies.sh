#!/usr/bin/env bash
# Cold-miss and cache-hit Verify against one Redis node, a Sentinel set and a
# three-shard Redis Cluster, in one run on this machine (loopback only):
# every topology is started here, one release `keystile serve` is pointed at
# it, and `keystile bench` loads that server. Prints one block per topology.
#
#   cargo build --release && bash benches/topologies.sh
#
# Environment: B (the keystile binary, default target/release/keystile),
# DURATION (default 2s), KEYS (fresh keys for the miss scenario, default 8000).
set -euo pipefail
cd "$(dirname "$0")/.."
B="${B:-target/release/keystile}"
DURATION="${DURATION:-2s}"
KEYS="${KEYS:-8000}"
work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
redis() { # port dir [args...]
  local p="$1" d="$2"; shift 2
  mkdir -p "$d"
  redis-server --port "$p" --bind 127.0.0.1 --save "" --appendonly no --dir "$d" --protected-mode no "$@" \
    >/dev/null 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do redis-cli -p "$p" ping >/dev/null 2>&1 && return; sleep 0.05; done
  echo "redis on $p did not start" >&2; exit 1
}
printf 'cd%.0s' $(seq 32) >"$work/pepper"

measure() { # name redis-flags...
  local name="$1"; shift
  local listen; listen="$(port)"
  local admin; admin="$("$B" keys bootstrap --pepper-file "$work/pepper" --quiet "$@")"
  "$B" serve --listen "127.0.0.1:$listen" --pepper-file "$work/pepper" --store-timeout 1s "$@" \
    >/dev/null 2>"$work/$name.log" &
  local pid=$!
  pids+=("$pid")
  for _ in $(seq 200); do "$B" verify x --server "127.0.0.1:$listen" >/dev/null 2>&1 && break; sleep 0.05; done
  echo "== $name"
  KEYSTILE_ADMIN_KEY="$admin" "$B" bench --server "http://127.0.0.1:$listen" --scenario miss,hit \
    --duration "$DURATION" --warmup 500ms --concurrency 16 --connections 2 --keys "$KEYS"
  kill "$pid"
}

# One node.
single="$(port)"; redis "$single" "$work/single"
measure single --redis-url "redis://127.0.0.1:$single"

# Sentinel: a primary, a replica, three sentinels.
primary="$(port)"; replica="$(port)"
redis "$primary" "$work/primary"
redis "$replica" "$work/replica" --replicaof 127.0.0.1 "$primary"
sentinels=()
for i in 1 2 3; do
  sp="$(port)"; mkdir -p "$work/s$i"
  printf 'port %s\nbind 127.0.0.1\nprotected-mode no\nsentinel monitor main 127.0.0.1 %s 2\n' "$sp" "$primary" \
    >"$work/s$i/sentinel.conf"
  redis-server "$work/s$i/sentinel.conf" --sentinel >/dev/null 2>&1 &
  pids+=($!)
  sentinels+=("127.0.0.1:$sp")
done
sleep 1
measure sentinel --redis-sentinel "$(IFS=,; echo "${sentinels[*]}")" --redis-sentinel-master main

# Cluster: three primaries with a replica each.
nodes=()
for i in 1 2 3 4 5 6; do
  cp="$(port)"
  # The bus port is given: the default (port + 10000) overflows above 55535.
  redis "$cp" "$work/c$i" --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000 \
    --cluster-port "$(port)"
  nodes+=("127.0.0.1:$cp")
done
redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes >/dev/null
for _ in $(seq 100); do
  redis-cli -p "${nodes[0]##*:}" cluster info | grep -q cluster_state:ok && break; sleep 0.1
done
sleep 1
measure cluster --redis-cluster "${nodes[0]},${nodes[1]},${nodes[2]}"
