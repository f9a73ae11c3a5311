#!/bin/sh
# What the official postgres image's entrypoint does, with Debian's
# PostgreSQL (the `postgres` image of `make e2e-local`): on first start, initdb in
# PGDATA with POSTGRES_USER and POSTGRES_PASSWORD and create POSTGRES_DB;
# then the server on every address, as the postgres user.
set -eu
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
data=${PGDATA:-/var/lib/postgresql/data}
user=${POSTGRES_USER:-postgres}
db=${POSTGRES_DB:-$user}
# The emptyDir was made by root; /run is empty in a fresh container.
mkdir -p /run/postgresql
chown postgres "$data" /run/postgresql
chmod 700 "$data"
as_postgres() { runuser -u postgres -- "$@"; }
if [ ! -s "$data/PG_VERSION" ]; then
  pwfile=$(mktemp)
  printf '%s' "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is required}" >"$pwfile"
  chown postgres "$pwfile"
  as_postgres "$bin/initdb" -D "$data" -U "$user" --pwfile="$pwfile" \
    --auth-local=trust --auth-host=scram-sha-256 >/dev/null
  rm -f "$pwfile"
  echo "host all all all scram-sha-256" >>"$data/pg_hba.conf"
  if [ "$db" != postgres ]; then
    echo "CREATE DATABASE \"$db\";" | as_postgres "$bin/postgres" --single -D "$data" postgres >/dev/null
  fi
fi
exec runuser -u postgres -- "$bin/postgres" -D "$data" -c listen_addresses='*' \
  -c unix_socket_directories=/run/postgresql
