#!/bin/sh
# The official postgres image's entrypoint, the part the tests use: on an empty PGDATA, initdb
# with POSTGRES_USER / POSTGRES_PASSWORD (scram-sha-256 over TCP, trust on the local socket),
# create POSTGRES_DB, listen on all addresses; then exec the server as PID 1. Runs as any uid that
# owns (or can create) PGDATA.
set -eu
case "${1:-postgres}" in -*) set -- postgres "$@" ;; esac
if [ "${1:-postgres}" != postgres ]; then exec "$@"; fi
[ $# -gt 0 ] && shift

: "${POSTGRES_USER:=postgres}"
: "${POSTGRES_DB:=$POSTGRES_USER}"
: "${PGDATA:=/var/lib/postgresql/data}"
export PGDATA

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ] && [ "${POSTGRES_HOST_AUTH_METHOD:-}" != trust ]; then
        echo "error: POSTGRES_PASSWORD is empty (or set POSTGRES_HOST_AUTH_METHOD=trust)" >&2
        exit 1
    fi
    mkdir -p "$PGDATA"
    chmod 0700 "$PGDATA"
    pwfile="$(mktemp)"
    printf '%s\n' "${POSTGRES_PASSWORD:-}" > "$pwfile"
    initdb --username="$POSTGRES_USER" --pwfile="$pwfile" --encoding=UTF8 --locale=C.UTF-8 \
        --auth-local=trust --auth-host="${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}" \
        -D "$PGDATA" > /dev/null
    rm -f "$pwfile"
    echo "host all all all ${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}" >> "$PGDATA/pg_hba.conf"
    echo "listen_addresses = '*'" >> "$PGDATA/postgresql.conf"
    if [ "$POSTGRES_DB" != postgres ]; then
        out="$(printf 'CREATE DATABASE "%s"\n' "$POSTGRES_DB" \
               | postgres --single -D "$PGDATA" postgres 2>&1)" || { echo "$out" >&2; exit 1; }
        case "$out" in *ERROR*) echo "$out" >&2; exit 1 ;; esac
    fi
    echo "initialised $PGDATA (user $POSTGRES_USER, database $POSTGRES_DB)" >&2
fi
exec postgres "$@"
