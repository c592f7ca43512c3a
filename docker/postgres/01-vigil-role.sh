#!/bin/sh
# Creates vigil's application role and database on the first start of the postgres
# container (docker-entrypoint-initdb.d). The role owns its database, so vigil can apply
# its migrations, and holds no other right: no superuser, no role or database creation.
#
# Environment: DB_USER (default server), DB_PASSWORD (required), DB_NAME (default vigil).
# Runs as the superuser through the image's entrypoint; also runnable by hand:
#   PGHOST=… PGUSER=postgres DB_PASSWORD=… sh docker/postgres/01-vigil-role.sh
set -eu
: "${DB_PASSWORD:?set DB_PASSWORD for the application role}"
DB_USER="${DB_USER:-server}"
DB_NAME="${DB_NAME:-vigil}"

psql -v ON_ERROR_STOP=1 --no-psqlrc --dbname="${POSTGRES_DB:-postgres}" \
  -v role="$DB_USER" -v password="$DB_PASSWORD" -v db="$DB_NAME" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION',
              :'role', :'password')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') \gexec
SELECT format('ALTER ROLE %I LOGIN PASSWORD %L NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION',
              :'role', :'password') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'role')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db') \gexec
SQL

# In its database the role owns the public schema (PostgreSQL 15 no longer lets every
# role create there).
psql -v ON_ERROR_STOP=1 --no-psqlrc --dbname="$DB_NAME" -v role="$DB_USER" <<'SQL'
SELECT format('ALTER SCHEMA public OWNER TO %I', :'role') \gexec
SQL
