#!/usr/bin/env bash
# Fails unless `systemd-analyze security` rates the unit's exposure 2.0 or lower.
set -euo pipefail
unit="$(dirname "$0")/turnstile.service"
limit="2.0"
if ! command -v systemd-analyze >/dev/null; then
  echo "systemd-analyze missing: installing Debian's systemd package (not started)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null
fi
report=$(systemd-analyze security --offline=true "$unit" 2>&1 || true)
level=$(printf '%s\n' "$report" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
if [ -z "$level" ]; then
  printf '%s\n' "$report" | tail -5
  echo "could not read the exposure level" >&2
  exit 1
fi
echo "turnstile.service exposure: $level (limit $limit)"
awk -v l="$level" -v m="$limit" 'BEGIN { exit !(l <= m) }' || { printf '%s\n' "$report" | grep '✗' >&2; exit 1; }
