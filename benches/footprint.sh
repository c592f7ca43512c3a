#!/usr/bin/env bash
# Agent footprint, side by side in one run: vigil running only a 1 s system_metrics job
# versus Prometheus node_exporter scraped every second, over the same window.
# Reports CPU seconds used during the window and peak RSS (VmHWM), and their ratios.
#
#   benches/footprint.sh [SECONDS]          (default 120)
#
# Needs the Debian package prometheus-node-exporter (installed here when run as root)
# and a PostgreSQL: TEST_DATABASE_URL, else the server on 127.0.0.1:5432.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_TO_RUN=${1:-120}

if ! command -v prometheus-node-exporter >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || { echo "install prometheus-node-exporter first" >&2; exit 1; }
  apt-get update -qq && apt-get install -y -qq prometheus-node-exporter >/dev/null
fi
cargo build --release --quiet

admin=${TEST_DATABASE_URL:-postgres://$(id -un)@127.0.0.1:5432/postgres}
db="vigil_footprint_$$"
psql -q "$admin" -c "CREATE DATABASE $db" >/dev/null
db_url="${admin%/*}/$db"

work=$(mktemp -d)
cat > "$work/jobs.toml" <<'TOML'
[[jobs]]
name = "host-metrics"
kind = "system_metrics"
every = "1s"
TOML

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
ne_port=$(free_port)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  psql -q "$admin" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

prometheus-node-exporter --web.listen-address="127.0.0.1:$ne_port" >"$work/ne.log" 2>&1 &
ne_pid=$!; pids+=("$ne_pid")
( while kill -0 "$ne_pid" 2>/dev/null; do
    curl -s -o /dev/null "http://127.0.0.1:$ne_port/metrics" || true
    sleep 1
  done ) &
pids+=("$!")

(cd "$work" && DATABASE_URL="$db_url" VIGIL_LOG=warn exec "$OLDPWD/target/release/vigil" run) >"$work/vigil.log" 2>&1 &
vigil_pid=$!; pids+=("$vigil_pid")

# Let both start up, then measure the window.
sleep 3
ticks=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
ne_start=$(cpu_ticks "$ne_pid"); vigil_start=$(cpu_ticks "$vigil_pid")
sleep "$SECONDS_TO_RUN"
ne_end=$(cpu_ticks "$ne_pid"); vigil_end=$(cpu_ticks "$vigil_pid")
hwm() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; }
ne_hwm=$(hwm "$ne_pid"); vigil_hwm=$(hwm "$vigil_pid")
samples=$(psql -Atq "$db_url" -c "SELECT count(*) FROM system_metrics")

python3 - "$SECONDS_TO_RUN" "$ticks" "$ne_start" "$ne_end" "$vigil_start" "$vigil_end" "$ne_hwm" "$vigil_hwm" "$samples" <<'PY'
import sys
secs, ticks, ns, ne, vs, ve, nh, vh, samples = map(float, sys.argv[1:])
ne_cpu, vigil_cpu = (ne - ns) / ticks, (ve - vs) / ticks
print(f"window: {secs:.0f} s; vigil wrote {samples:.0f} samples")
print(f"{'':16}{'CPU seconds':>12}{'peak RSS MiB':>14}")
print(f"{'node_exporter':16}{ne_cpu:>12.2f}{nh/1024:>14.1f}")
print(f"{'vigil':16}{vigil_cpu:>12.2f}{vh/1024:>14.1f}")
print(f"vigil / node_exporter: CPU {vigil_cpu/ne_cpu if ne_cpu else float('nan'):.2f}x, peak RSS {vh/nh:.2f}x")
PY
