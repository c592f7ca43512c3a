#!/usr/bin/env bash
# Logical backup and restore of vigil's database, with pg_dump's custom format.
#
#   scripts/pg-backup.sh dump  > FILE     # writes the dump to stdout
#   scripts/pg-backup.sh restore < FILE   # restores it, replacing what is there
#
# The connection comes from libpq's variables (PGHOST, PGPORT, PGUSER, PGPASSWORD,
# PGDATABASE). PG_EXEC prefixes the commands: the Makefile sets it to run them inside
# the stack's postgres container (`docker compose exec -T postgres`).
set -euo pipefail
read -r -a exec_prefix <<<"${PG_EXEC:-}"

case "${1:-}" in
  dump)
    # No owners or grants in the dump: it restores as whichever role restores it.
    "${exec_prefix[@]}" pg_dump --format=custom --no-owner --no-privileges
    ;;
  restore)
    # pg_restore --clean cannot replace partitioned tables (it drops each partition's
    # inherited key on its own, which PostgreSQL refuses). So: drop every table and
    # function the dump holds (a partitioned table with its partitions), then replay
    # the dump, all in one transaction: a failed restore leaves the database as it was.
    dump=$(mktemp)
    trap 'rm -f "$dump"' EXIT
    cat >"$dump"
    tables=$("${exec_prefix[@]}" pg_restore --list <"$dump" \
      | awk '$4 == "TABLE" && $5 != "DATA" && $5 != "ATTACH" && $5 !~ /^pg_/ { printf "DROP TABLE IF EXISTS \"%s\".\"%s\" CASCADE;\n", $5, $6 }
             $4 == "FUNCTION" { sig = $0; sub(/^.* FUNCTION [^ ]+ /, "", sig); sub(/\) [^)]*$/, ")", sig)
                                printf "DROP FUNCTION IF EXISTS \"%s\".%s CASCADE;\n", $5, sig }')
    {
      printf '%s\n' "$tables"
      "${exec_prefix[@]}" pg_restore --no-owner --no-privileges --file=- <"$dump"
    } | "${exec_prefix[@]}" psql -X -q -v ON_ERROR_STOP=1 --single-transaction \
          --dbname="${PGDATABASE:-vigil}" >/dev/null
    ;;
  *)
    echo "usage: $0 dump > FILE | restore < FILE" >&2
    exit 2
    ;;
esac
