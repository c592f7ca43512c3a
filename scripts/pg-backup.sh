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
    # One transaction: a failed restore leaves the database as it was.
    "${exec_prefix[@]}" pg_restore --clean --if-exists --no-owner --no-privileges \
      --single-transaction --exit-on-error --dbname="${PGDATABASE:-vigil}"
    ;;
  *)
    echo "usage: $0 dump > FILE | restore < FILE" >&2
    exit 2
    ;;
esac
