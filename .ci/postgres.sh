#!/usr/bin/env bash
# Installs (if missing) and starts the PostgreSQL 15 server the tests and benchmarks use.
# Idempotent: safe to run on a fresh Debian 12 machine or one where it already runs.
# Listens on 127.0.0.1 only. Creates role `oblivio` (password `oblivio`, CREATEDB so the
# test fixtures can make one throw-away database per session) and database `oblivio_test`.
set -euo pipefail

PG_VERSION=${PG_VERSION:-15}
PG_CLUSTER=${PG_CLUSTER:-main}
PG_BIN=/usr/lib/postgresql/$PG_VERSION/bin

if [ "$(id -u)" -ne 0 ]; then
  echo "postgres.sh: must run as root (installs packages, starts the cluster)" >&2
  exit 1
fi

if ! command -v pg_ctlcluster >/dev/null || [ ! -x "$PG_BIN/postgres" ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq postgresql >/dev/null
fi

if ! pg_lsclusters -h | awk '{print $1" "$2}' | grep -qx "$PG_VERSION $PG_CLUSTER"; then
  pg_createcluster "$PG_VERSION" "$PG_CLUSTER" >/dev/null
fi

# Loopback only: a test database must never be reachable from the network. conf.d is
# included last by Debian's postgresql.conf, so this file wins over the main one.
conf_dir=/etc/postgresql/$PG_VERSION/$PG_CLUSTER/conf.d
wanted="listen_addresses = '127.0.0.1'"
mkdir -p "$conf_dir"
if [ "$(cat "$conf_dir/oblivio.conf" 2>/dev/null)" != "$wanted" ]; then
  echo "$wanted" >"$conf_dir/oblivio.conf"
  if pg_lsclusters -h | awk -v v="$PG_VERSION" -v c="$PG_CLUSTER" '$1==v && $2==c {print $4}' \
      | grep -q online; then
    pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" restart
  fi
fi

if ! pg_lsclusters -h | awk -v v="$PG_VERSION" -v c="$PG_CLUSTER" '$1==v && $2==c {print $4}' \
    | grep -q online; then
  pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" start
fi

# Wait (bounded) until it accepts connections.
for _ in $(seq 1 30); do
  if runuser -u postgres -- psql -qtAc "SELECT 1" >/dev/null 2>&1; then break; fi
  sleep 1
done

runuser -u postgres -- psql -v ON_ERROR_STOP=1 -qtA >/dev/null <<'SQL'
DO $$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'oblivio') THEN
    CREATE ROLE oblivio LOGIN PASSWORD 'oblivio' CREATEDB;
  ELSE
    ALTER ROLE oblivio LOGIN PASSWORD 'oblivio' CREATEDB;
  END IF;
END
$$;
SQL

if ! runuser -u postgres -- psql -qtAc "SELECT 1 FROM pg_database WHERE datname = 'oblivio_test'" \
    | grep -q 1; then
  runuser -u postgres -- createdb -O oblivio oblivio_test
fi

port=$(runuser -u postgres -- psql -qtAc "SHOW port")
echo "postgres.sh: PostgreSQL $PG_VERSION/$PG_CLUSTER up on 127.0.0.1:$port"
