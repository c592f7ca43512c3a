#!/usr/bin/env bash
# Agent footprint, side by side in one window: vigil running the shipped host job at
# 1 s (gateway up), collectd with a comparable plugin set (cpu, memory, df, interface,
# load) writing to PostgreSQL through its postgresql plugin every second, and
# Prometheus node_exporter scraped every second. A second vigil runs the same job
# collecting only what collectd's plugins collect (cpu, memory, disk, network, load),
# for a like-for-like figure: the shipped job also reads every process each sample.
# Reports each one's CPU seconds during the window, resident memory (the peak, start-up
# included: the larger of VmHWM and the VmRSS sampled ten times a second from launch,
# since the kernel's VmHWM misses a peak that madvise later lowered; the largest VmRSS
# seen each second in the window; VmRSS at the end), and vigil's ratios.
#
#   benches/footprint.sh [SECONDS]          (default 120)
#
# Needs Debian's collectd-core and prometheus-node-exporter (installed here when run
# as root) and a PostgreSQL: TEST_DATABASE_URL, else the server on 127.0.0.1:5432.
# FOOTPRINT_ENV adds environment to vigil (e.g. "MALLOC_ARENA_MAX=8") and
# FOOTPRINT_BIN names another vigil binary, to compare. FOOTPRINT_WARMUP (default 35)
# is how many seconds the agents run before the window: vigil hands its start-up code
# back 30 s in (src/app/memory.rs), so the window measures the steady state; the peak
# column still shows start-up.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_TO_RUN=${1:-120}

missing=()
command -v prometheus-node-exporter >/dev/null 2>&1 || missing+=(prometheus-node-exporter)
[ -x /usr/sbin/collectd ] || missing+=(collectd-core)
[ -e /usr/lib/x86_64-linux-gnu/libpq.so.5 ] || missing+=(libpq5)
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { echo "install ${missing[*]} first" >&2; exit 1; }
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
vigil_bin=${FOOTPRINT_BIN:-}
if [ -z "$vigil_bin" ]; then
  cargo build --release --quiet
  vigil_bin="$PWD/target/release/vigil"
fi

admin=${TEST_DATABASE_URL:-postgres://$(id -un)@127.0.0.1:5432/postgres}
db="vigil_footprint_$$"
db5="vigil5_footprint_$$"
cdb="collectd_footprint_$$"
psql -q "$admin" -c "CREATE DATABASE $db" >/dev/null
psql -q "$admin" -c "CREATE DATABASE $db5" >/dev/null
psql -q "$admin" -c "CREATE DATABASE $cdb" >/dev/null
db_url="${admin%/*}/$db"
db5_url="${admin%/*}/$db5"
cdb_url="${admin%/*}/$cdb"
# collectd's own example schema and insert function, as its documentation ships them.
psql -q "$cdb_url" -f /usr/share/doc/collectd-core/examples/postgresql/collectd_insert.sql >/dev/null

work=$(mktemp -d)
mkdir "$work/five"
# The shipped host job, at 1 s; and the same collecting collectd's plugins' sections.
python3 - jobs.toml "$work/jobs.toml" "$work/five/jobs.toml" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
jobs = re.split(r"(?m)^(?=\[\[jobs\]\])", text)
host = next(j for j in jobs if 'kind = "system_metrics"' in j)
host = re.sub(r'(?m)^every = ".*"$', 'every = "1s"', host)
open(sys.argv[2], "w").write(host)
five, n = re.subn(r'(?ms)^collect = \[.*?\]',
                  'collect = ["cpu", "memory", "disk", "network", "load"]', host)
assert n == 1, "the shipped host job has no collect list"
open(sys.argv[3], "w").write(five)
PY

pg_host=$(python3 -c 'import sys, urllib.parse as u; p = u.urlparse(sys.argv[1]); print(p.hostname or "127.0.0.1", p.port or 5432, p.username or "", sep=" ")' "$admin")
read -r cd_host cd_port cd_user <<<"$pg_host"
cat > "$work/collectd.conf" <<CONF
Hostname "footprint"
FQDNLookup false
Interval 1
TypesDB "/usr/share/collectd/types.db"
LoadPlugin cpu
LoadPlugin memory
LoadPlugin df
LoadPlugin interface
LoadPlugin load
LoadPlugin postgresql
<Plugin df>
  FSType tmpfs
  FSType overlay
  IgnoreSelected true
</Plugin>
<Plugin interface>
  Interface lo
  IgnoreSelected true
</Plugin>
<Plugin postgresql>
  <Writer sqlstore>
    Statement "SELECT collectd_insert(\$1, \$2, \$3, \$4, \$5, \$6, \$7, \$8, \$9);"
    StoreRates true
  </Writer>
  <Database $cdb>
    Host "$cd_host"
    Port "$cd_port"
    User "$cd_user"
    Writer sqlstore
    CommitInterval 1
  </Database>
</Plugin>
CONF

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
ne_port=$(free_port)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  psql -q "$admin" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  psql -q "$admin" -c "DROP DATABASE IF EXISTS $db5 WITH (FORCE)" >/dev/null 2>&1 || true
  psql -q "$admin" -c "DROP DATABASE IF EXISTS $cdb WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

prometheus-node-exporter --web.listen-address="127.0.0.1:$ne_port" >"$work/ne.log" 2>&1 &
ne_pid=$!; pids+=("$ne_pid")
# Scraped each second by one long-lived process, as Prometheus scrapes from elsewhere:
# a shell loop of curl and sleep started two processes a second on the measured host,
# which every agent that reads the process table paid for and no deployment has.
python3 - "$ne_port" <<'PY' &
import sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/metrics"
while True:
    try:
        urllib.request.urlopen(url, timeout=5).read()
    except OSError:
        pass
    time.sleep(1)
PY
pids+=("$!")

/usr/sbin/collectd -f -C "$work/collectd.conf" >"$work/collectd.log" 2>&1 &
cd_pid=$!; pids+=("$cd_pid")

read -r -a extra_env <<<"${FOOTPRINT_ENV:-}"
# Each binary is on disk before it starts, as an installed one is: vigil drops its
# file's unmapped pages from the page cache (src/app/memory.rs), which the kernel
# cannot do for pages still waiting to be written (a fresh build, a fresh copy).
sync "$vigil_bin"
(cd "$work" && exec env "${extra_env[@]}" DATABASE_URL="$db_url" PORT="$(free_port)" VIGIL_LOG=warn \
   "$vigil_bin" run) >"$work/vigil.log" 2>&1 &
vigil_pid=$!; pids+=("$vigil_pid")
# From its own copy of the binary: vigil pages its code out after start-up, and the
# kernel skips pages another process maps, so two from one file would both stay larger.
cp "$vigil_bin" "$work/five/vigil"
sync "$work/five/vigil"
(cd "$work/five" && exec env "${extra_env[@]}" DATABASE_URL="$db5_url" PORT="$(free_port)" VIGIL_LOG=warn \
   ./vigil run) >"$work/vigil5.log" 2>&1 &
vigil5_pid=$!; pids+=("$vigil5_pid")

# Let all three start up and settle, then measure the window. Through the warm-up each
# agent's VmRSS is sampled ten times a second (by one process): the start-up peak.
warmup_rss=$(python3 - "${FOOTPRINT_WARMUP:-35}" "$ne_pid" "$cd_pid" "$vigil_pid" "$vigil5_pid" <<'PY'
import sys, time
secs, pids = float(sys.argv[1]), sys.argv[2:]
def rss(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0
most = [0] * len(pids)
end = time.monotonic() + secs
while time.monotonic() < end:
    most = [max(m, rss(p)) for m, p in zip(most, pids)]
    time.sleep(0.1)
print(*most)
PY
)
read -r ne_smax cd_smax vigil_smax vigil5_smax <<<"$warmup_rss"
for p in "$ne_pid" "$cd_pid" "$vigil_pid" "$vigil5_pid"; do
  kill -0 "$p" 2>/dev/null || { tail -n 20 "$work"/*.log "$work"/five/*.log >&2; echo "an agent did not start" >&2; exit 1; }
done
ticks=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
ne_start=$(cpu_ticks "$ne_pid"); cd_start=$(cpu_ticks "$cd_pid"); vigil_start=$(cpu_ticks "$vigil_pid")
vigil5_start=$(cpu_ticks "$vigil5_pid")
cd_rows_start=$(psql -Atq "$cdb_url" -c 'SELECT count(*) FROM "values"')
# The window, watching each agent's resident memory every second (one process, so the
# watching starts none): the largest it reached while measured, after start-up.
window_rss=$(python3 - "$SECONDS_TO_RUN" "$ne_pid" "$cd_pid" "$vigil_pid" "$vigil5_pid" <<'PY'
import sys, time
secs, pids = float(sys.argv[1]), sys.argv[2:]
def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
most = [rss(p) for p in pids]
end = time.monotonic() + secs
while (left := end - time.monotonic()) > 0:
    time.sleep(min(1.0, left))
    most = [max(m, rss(p)) for m, p in zip(most, pids)]
print(*most)
PY
)
read -r ne_wmax cd_wmax vigil_wmax vigil5_wmax <<<"$window_rss"
ne_end=$(cpu_ticks "$ne_pid"); cd_end=$(cpu_ticks "$cd_pid"); vigil_end=$(cpu_ticks "$vigil_pid")
vigil5_end=$(cpu_ticks "$vigil5_pid")
status() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }
peak() { local hwm; hwm=$(status "$1" VmHWM); echo $(( hwm > $2 ? hwm : $2 )); }
samples=$(psql -Atq "$db_url" -c "SELECT count(*) FROM system_metrics")
cd_rows=$(( $(psql -Atq "$cdb_url" -c 'SELECT count(*) FROM "values"') - cd_rows_start ))

python3 - "$SECONDS_TO_RUN" "$ticks" "$samples" "$cd_rows" \
  "$ne_start" "$ne_end" "$(peak "$ne_pid" "$ne_smax")" "$ne_wmax" "$(status "$ne_pid" VmRSS)" \
  "$cd_start" "$cd_end" "$(peak "$cd_pid" "$cd_smax")" "$cd_wmax" "$(status "$cd_pid" VmRSS)" \
  "$vigil_start" "$vigil_end" "$(peak "$vigil_pid" "$vigil_smax")" "$vigil_wmax" "$(status "$vigil_pid" VmRSS)" \
  "$vigil5_start" "$vigil5_end" "$(peak "$vigil5_pid" "$vigil5_smax")" "$vigil5_wmax" "$(status "$vigil5_pid" VmRSS)" <<'PY'
import sys
a = list(map(float, sys.argv[1:]))
secs, ticks, samples, cd_rows = a[:4]
agents = {}
for i, name in enumerate(["node_exporter", "collectd", "vigil", "vigil (5 sections)"]):
    s, e, hwm, wmax, rss = a[4 + 5 * i: 9 + 5 * i]
    agents[name] = ((e - s) / ticks, max(hwm, wmax) / 1024, wmax / 1024, rss / 1024)
print(f"window: {secs:.0f} s; vigil wrote {samples:.0f} samples, collectd {cd_rows:.0f} values")
print("peak RSS: the largest ever (start-up included, sampled at 10 Hz and VmHWM); window RSS: the largest while measured")
print(f"{'':20}{'CPU s':>8}{'CPU s/min':>11}{'peak RSS MiB':>14}{'window RSS':>12}{'RSS MiB':>9}")
for name, (cpu, hwm, wmax, rss) in agents.items():
    print(f"{name:20}{cpu:>8.2f}{cpu * 60 / secs:>11.3f}{hwm:>14.1f}{wmax:>12.1f}{rss:>9.1f}")
v, c, n = agents["vigil"], agents["collectd"], agents["node_exporter"]
v5 = agents["vigil (5 sections)"]
def ratio(a, b):
    return (f"CPU {a[0] / b[0]:.2f}x, peak RSS {a[1] / b[1]:.2f}x, "
            f"window RSS {a[2] / b[2]:.2f}x, RSS {a[3] / b[3]:.2f}x")
print(f"vigil / collectd:              {ratio(v, c)}")
print(f"vigil (5 sections) / collectd: {ratio(v5, c)}")
print(f"vigil / node_exporter:         {ratio(v, n)}")
PY
