#!/usr/bin/env bash
# Gateway load, 64 connections for 10 s each with wrk: throughput and latency of GET /,
# GET /api/reading?limit=100 (over 100,000 readings) and GET /api/jobs, the last one
# twice: alone, and while a 1 s system_metrics job runs (the ratio is the job's cost).
#
#   benches/http_load.sh [SECONDS]          (default 10)
#
# Needs wrk (Debian package `wrk`, installed here when run as root) and a PostgreSQL:
# TEST_DATABASE_URL, else the server on 127.0.0.1:5432.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${1:-10}

if ! command -v wrk >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || { echo "install wrk first" >&2; exit 1; }
  apt-get update -qq && apt-get install -y -qq wrk >/dev/null
fi
cargo build --release --quiet

admin=${TEST_DATABASE_URL:-postgres://$(id -un)@127.0.0.1:5432/postgres}
db="vigil_http_load_$$"
psql -q "$admin" -c "CREATE DATABASE $db" >/dev/null
db_url="${admin%/*}/$db"
work=$(mktemp -d)
pid=""
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  psql -q "$admin" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
start() { # $1: enabled = true|false for the metrics job
  cat > "$work/jobs.toml" <<TOML
[[jobs]]
name = "host-metrics"
kind = "system_metrics"
every = "1s"
enabled = $1

[[jobs]]
name = "prune"
kind = "retention"
cron = "0 0 3 * * *"
[jobs.settings]
tables = [{ table = "system_metrics", column = "ts", older_than = "30d" }]
TOML
  (cd "$work" && DATABASE_URL="$db_url" PORT="$port" VIGIL_LOG=warn exec "$OLDPWD/target/release/vigil" run) >"$work/vigil.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && return; sleep 0.1; done
  echo "vigil did not become ready" >&2; cat "$work/vigil.log" >&2; exit 1
}
stop() { kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""; }

load() { # $1 label, $2 path
  local out
  out=$(wrk -t2 -c64 -d"${DURATION}s" --latency "http://127.0.0.1:$port$2")
  printf '%-38s %10s req/s   p50 %8s   p99 %8s\n' "$1" \
    "$(awk '/Requests\/sec/ {print $2}' <<<"$out")" \
    "$(awk '$1 == "50%" {print $2}' <<<"$out")" \
    "$(awk '$1 == "99%" {print $2}' <<<"$out")"
  if grep -q "Non-2xx" <<<"$out"; then grep "Non-2xx" <<<"$out"; fi
}

start false
psql -q "$db_url" -c "INSERT INTO reading_analytics (source_id, payload, occurred_at)
  SELECT 'doc-' || g, jsonb_build_object('sensor', 'probe-' || (g % 50), 'value', g * 0.5,
         'unit', 'C', 'tags', jsonb_build_array('a', 'b')), now() - g * interval '1 second'
  FROM generate_series(1, 100000) g" >/dev/null
psql -q "$db_url" -c "VACUUM ANALYZE reading_analytics" >/dev/null
echo "wrk -t2 -c64 -d${DURATION}s against vigil (release build), $(nproc) cores"
load "GET /" "/"
load "GET /api/reading?limit=100" "/api/reading?limit=100"
load "GET /api/jobs (no metrics job)" "/api/jobs"
stop
start true
sleep 2
load "GET /api/jobs (1 s metrics job running)" "/api/jobs"
samples=$(psql -Atq "$db_url" -c "SELECT count(*) FROM system_metrics")
echo "the metrics job wrote $samples samples meanwhile"
