#!/usr/bin/env bash
# GET /api/jobs over a big ledger: 20 jobs, first with an empty ledger (the baseline),
# then with 1,000,000 runs over 90 days, wrk with 64 connections each time against a
# release build, once vigil has settled (35 s). Prints req/s, p50 and p99 of both and
# the ratio; the target is p99 under 20 ms and within 2x of the empty ledger.
#
#   benches/api_jobs.sh [SECONDS [ROWS]]          (default 10 s, 1,000,000 rows)
#
# Needs wrk (Debian package `wrk`, installed here when run as root) and a PostgreSQL:
# TEST_DATABASE_URL, else the server on 127.0.0.1:5432.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${1:-10}
ROWS=${2:-1000000}

if ! command -v wrk >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || { echo "install wrk first" >&2; exit 1; }
  apt-get update -qq && apt-get install -y -qq wrk >/dev/null
fi
cargo build --release --quiet

admin=${TEST_DATABASE_URL:-postgres://$(id -un)@127.0.0.1:5432/postgres}
db="vigil_api_jobs_$$"
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

for i in $(seq -w 1 20); do
  cat >> "$work/jobs.toml" <<TOML
[[jobs]]
name = "job-$i"
kind = "command"
cron = "0 0 0 1 1 *"
[jobs.settings]
command = ["true"]

TOML
done
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
(cd "$work" && DATABASE_URL="$db_url" PORT="$port" VIGIL_LOG=warn exec "$OLDPWD/target/release/vigil" run) >"$work/vigil.log" 2>&1 &
pid=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
curl -sf "http://127.0.0.1:$port/readyz" >/dev/null || { cat "$work/vigil.log" >&2; exit 1; }

# Prints "req/s p50_ms p99_ms".
load() {
  local out
  out=$(wrk -t2 -c64 -d"${DURATION}s" --latency "http://127.0.0.1:$port/api/jobs")
  if grep -q "Non-2xx" <<<"$out"; then grep "Non-2xx" <<<"$out" >&2; exit 1; fi
  python3 - "$out" <<'PY'
import re, sys
out = sys.argv[1]
def ms(v):
    n, unit = re.match(r"([\d.]+)(\w+)", v).groups()
    return float(n) * {"us": 0.001, "ms": 1, "s": 1000}[unit]
rps = re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)
p50 = ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))
p99 = ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))
print(rps, p50, p99)
PY
}

# Both loads measure the steady state: vigil reads its code from disk page by page as
# paths are first used, and hands its start-up code back 30 s in (src/app/memory.rs);
# those one-time costs belong to neither ledger size.
sleep 35
read -r empty_rps empty_p50 empty_p99 <<<"$(load)"
t0=$(date +%s)
psql -q "$db_url" -c "INSERT INTO job_runs (id, job, kind, trigger, attempt, scheduled_at, started_at,
                                            finished_at, status, host, permanent)
  SELECT gen_random_uuid(), 'job-' || lpad((1 + g % 20)::text, 2, '0'), 'command', 'schedule', 1,
         t, t, t + interval '2 seconds',
         CASE WHEN g % 50 = 0 THEN 'failed' ELSE 'succeeded' END, 'bench', false
  FROM generate_series(1, $ROWS) g,
       LATERAL (SELECT now() - (g * (interval '90 days' / $ROWS)) AS t) x" >/dev/null
psql -q "$db_url" -c "VACUUM ANALYZE job_runs" >/dev/null
echo "inserted $ROWS ledger rows over 20 jobs in $(( $(date +%s) - t0 )) s"
read -r full_rps full_p50 full_p99 <<<"$(load)"

python3 - "$empty_rps" "$empty_p50" "$empty_p99" "$full_rps" "$full_p50" "$full_p99" "$ROWS" <<'PY'
import sys
er, e50, e99, fr, f50, f99, rows = map(float, sys.argv[1:])
print(f"GET /api/jobs, wrk -c64, release build, {int(rows):,} runs over 20 jobs:")
print(f"  empty ledger (baseline)  {er:>8,.0f} req/s   p50 {e50:6.2f} ms   p99 {e99:6.2f} ms")
print(f"  {int(rows):,} runs        {fr:>8,.0f} req/s   p50 {f50:6.2f} ms   p99 {f99:6.2f} ms")
print(f"  p99 ratio {f99 / e99:.2f}x (target within 2x); p99 {'under' if f99 < 20 else 'OVER'} 20 ms")
PY
