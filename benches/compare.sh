#!/usr/bin/env bash
# Ingest side by side, in one run, on this machine: the same wrk client and
# script (the replica's wrk-webhook.lua: a unique id per request, 1000 phones)
# against
#   1. bare       - the same HTTP stack answering 200, storing nothing (the ceiling)
#   2. turnstile  - release build, defaults: every acknowledgement fsynced (group commit)
#   3. replica    - the Node + Redis + BullMQ system turnstile replaces (../shared/seed-replica)
# Loopback only; every run is bounded by DURATION. Needs root for apt-get the
# first time (wrk, redis-server) and the npm registry for the replica.
#
#   bash benches/compare.sh                 # 20 s per target
#   DURATION=10 CONNECTIONS=64 bash benches/compare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${DURATION:-20}"
CONNECTIONS="${CONNECTIONS:-32}"
REPLICA="${REPLICA:-$(cd .. && pwd)/shared/seed-replica}"
OUT="${OUT:-target/compare}"
mkdir -p "$OUT"
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -x "$work/replica/stop.sh" ] && (cd "$work/replica" && RUN_DIR="$work/replica/run" ./stop.sh >/dev/null 2>&1 || true)
  rm -rf "$work"
}
trap cleanup EXIT

need() { command -v "$1" >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null; }; }
need wrk wrk
need strace strace
need redis-server redis-server

cargo build --release --quiet --bin turnstile --example bare
wait_http() { for _ in $(seq 1 200); do curl -fsS -o /dev/null "$@" 2>/dev/null && return 0; sleep 0.05; done; echo "no answer from ${*: -1}" >&2; return 1; }
load() { # name url
  echo "== $1: wrk -t2 -c$CONNECTIONS -d${DURATION}s"
  PHONES=1000 RUN_ID="$1-$$" wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" --timeout 10s --latency \
    -s "$REPLICA/wrk-webhook.lua" "$2" | tee "$OUT/$1.txt" | grep -E "requests:|latency ms"
}

# 1. the ceiling
target/release/examples/bare 127.0.0.1:8090 & pids+=($!)
wait_http -X POST -H 'content-type: application/json' -d '{"id":"w","from":"79000000000","message":"x"}' http://127.0.0.1:8090/webhook/whatsapp/batched
load bare http://127.0.0.1:8090/webhook/whatsapp/batched
kill "${pids[-1]}"

# 2. turnstile, on its defaults
TURNSTILE_SERVER_LISTEN=127.0.0.1:8091 TURNSTILE_SERVER_ADMIN_LISTEN=127.0.0.1:8092 \
  TURNSTILE_SERVER_DATA_DIR="$work/data" TURNSTILE_LOG_FILTER=warn \
  target/release/turnstile serve & pids+=($!)
tpid=${pids[-1]}
wait_http http://127.0.0.1:8091/readyz
rss_idle=$(awk '/VmRSS/ {print $2}' /proc/$tpid/status)
cpu() { awk '{print $14 + $15}' /proc/$tpid/stat; }   # utime + stime, clock ticks
cpu_before=$(cpu)
load turnstile http://127.0.0.1:8091/webhook/whatsapp/batched
cpu_used=$(awk -v a="$cpu_before" -v b="$(cpu)" -v hz="$(getconf CLK_TCK)" -v d="$DURATION" 'BEGIN { printf "%.2f", (b - a) / hz / d }')
rss_loaded=$(awk '/VmRSS/ {print $2}' /proc/$tpid/status)
metric() { curl -fsS http://127.0.0.1:8092/metrics | awk -v m="$1" '$1 == m {print $2}'; }
stored=$(metric turnstile_messages_stored_total); log_syncs=$(metric turnstile_log_syncs_total)
store_syncs=$(metric turnstile_store_syncs_total); fsyncs=$(metric turnstile_fsyncs_total)
# Which sync calls, counted by the kernel's view (a short extra load under strace, not measured).
syscalls=""
if command -v strace >/dev/null; then
  strace -f -c -e trace=fdatasync,fsync,sync_file_range -p "$tpid" -o "$OUT/strace.txt" & spid=$!
  sleep 0.5
  PHONES=1000 RUN_ID="strace-$$" wrk -t2 -c"$CONNECTIONS" -d3s -s "$REPLICA/wrk-webhook.lua" \
    http://127.0.0.1:8091/webhook/whatsapp/batched >/dev/null
  kill -INT "$spid"; wait "$spid" || true
  syscalls=$(awk '$NF ~ /^(fdatasync|fsync|sync_file_range)$/ {printf "%s %s; ", $NF, $4}' "$OUT/strace.txt")
fi
kill -TERM "$tpid"; wait "$tpid" || true
{
  echo "turnstile: RSS idle ${rss_idle} kB, after load ${rss_loaded} kB; CPU ${cpu_used} cores during load; data dir $(du -sh "$work/data" | cut -f1)"
  echo "turnstile: ${stored} messages stored, ${log_syncs} fdatasyncs of the message log: $(awk -v a="$stored" -v s="$log_syncs" 'BEGIN { printf "%.1f", a / s }') acks per sync; ${store_syncs} syncs of sled's files; ${fsyncs} sync calls in all"
  [ -n "$syscalls" ] && echo "turnstile: sync syscalls under strace -f -c (3 s more load): ${syscalls}"
} | tee "$OUT/turnstile-extra.txt"

# 3. the replica, as its README runs it, from a copy (its node_modules stay out of shared/)
if command -v node >/dev/null; then
  cp -r "$REPLICA" "$work/replica"
  # npm 11 refuses the replica's lock in `npm ci` (optional platform packages); install from it instead.
  (cd "$work/replica" && rm -rf run node_modules &&
    { npm ci --no-audit --no-fund >/dev/null 2>&1 || npm install --no-audit --no-fund >/dev/null 2>&1; })
  (cd "$work/replica" && RUN_DIR="$work/replica/run" ./start.sh >/dev/null)
  load replica http://127.0.0.1:3100/webhook/whatsapp/batched
  (cd "$work/replica" && RUN_DIR="$work/replica/run" ./stop.sh >/dev/null)
else
  echo "node not installed: replica skipped"
fi

rate() { grep -o 'requests: [0-9]* in [0-9.]* s = [0-9.]*' "$OUT/$1.txt" | awk '{print $NF}'; }
pct() { grep 'latency ms' "$OUT/$1.txt" | sed -n "s/.*$2 \([0-9.]*\).*/\1/p"; }
echo
printf '%-10s %12s %10s %10s %10s\n' target "req/s" "p50 ms" "p99 ms" "vs bare"
for t in bare turnstile replica; do
  [ -f "$OUT/$t.txt" ] || continue
  printf '%-10s %12s %10s %10s %9.0f%%\n' "$t" "$(rate $t)" "$(pct $t p50)" "$(pct $t p99)" \
    "$(awk -v a="$(rate $t)" -v b="$(rate bare)" 'BEGIN { print 100 * a / b }')"
done | tee "$OUT/summary.txt"
if [ -f "$OUT/replica.txt" ]; then
  awk -v t="$(rate turnstile)" -v r="$(rate replica)" -v b="$(rate bare)" \
    'BEGIN { printf "turnstile: %.1fx the replica, %.0f%% of the bare server\n", t / r, 100 * t / b }' | tee -a "$OUT/summary.txt"
fi
