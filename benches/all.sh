#!/usr/bin/env bash
# The whole benchmark suite, one command: context storage, the pipeline
# (recovery, memory, debounce precision, turn overhead), ingest during an
# online backup of 1,000,000 contexts, and ingest side by
# side with the ceiling and the replica. Figures land in target/bench-all.txt.
#   bash benches/all.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/bench-all.txt
mkdir -p target
{
  echo "# $(date -u +%FT%TZ) on $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)"
  taskset -c 0 cargo bench --quiet --bench context
  cargo bench --quiet --bench pipeline
  cargo bench --quiet --bench backup
  bash benches/compare.sh
} 2>&1 | tee "$out"
