# scripts/bench-common.sh — shell functions shared by the benchmark scripts (sourced, not run).
#
# Provides logging (log, die, shout), the server's lifecycle (process_running, wait_until_ready,
# stop_server, print_server_log), a free loopback port (find_free_port) and the benchmark PostgreSQL database
# (psql_admin, postgres_reachable, reset_postgres_database).
#
# The sourcing script may set, before calling these functions:
#   log_tag              prefix of log lines                       (default "bench")
#   server_pid           pid of the running `custodian serve`, or empty
#   postgres_database    the database reset_postgres_database drops and recreates
# PostgreSQL is expected at 127.0.0.1:5432, user postgres, trust auth.

# A benchmark measures the server, not its per-client budget: the load generators send far more
# than one client's default rate.
export CUSTODIAN_RATE_LIMIT__CLIENT_PER_SEC=0 CUSTODIAN_RATE_LIMIT__UNAUTHENTICATED_PER_SEC=0

postgres_host="${postgres_host:-127.0.0.1}"
postgres_port="${BENCH_POSTGRES_PORT:-${postgres_port:-5432}}"
ready_timeout_secs="${ready_timeout_secs:-60}"
shutdown_timeout_secs="${shutdown_timeout_secs:-30}"
server_pid="${server_pid:-}"

log() { echo "${log_tag:-bench}: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

shout() {
    local line="!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
    {
        echo "$line"
        echo "!!! $*"
        echo "$line"
    } >&2
}

# Whether a process runs. `kill -0` also succeeds on a zombie, and the server stays one (it is our
# child) until stop_server reaps it, so the state is read from /proc.
process_running() {
    local state
    state="$(awk '/^State:/ { print $2 }' "/proc/$1/status" 2>/dev/null || true)"
    [[ -n "$state" && "$state" != Z && "$state" != X ]]
}

# Stops the running server (SIGTERM, then SIGKILL after a grace period) and reaps it.
stop_server() {
    [[ -n "$server_pid" ]] || return 0
    local pid="$server_pid" exit_status=0 waited=0
    server_pid=""
    if ! process_running "$pid"; then
        wait "$pid" 2>/dev/null || exit_status=$?
        log "server (pid $pid) had already exited, with status $exit_status"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    while process_running "$pid" && ((waited < shutdown_timeout_secs * 4)); do
        sleep 0.25
        waited=$((waited + 1))
    done
    if process_running "$pid"; then
        log "warning: server (pid $pid) ignored SIGTERM for ${shutdown_timeout_secs}s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || exit_status=$?
    # A graceful shutdown exits 0; anything else is worth a look but does not void the numbers.
    if ((exit_status != 0)); then
        log "warning: server exited with status $exit_status after SIGTERM"
    fi
}

print_server_log() {
    local server_log="$1"
    log "---- server log ($server_log) ----"
    if [[ -s "$server_log" ]]; then
        tail -n 200 -- "$server_log" >&2
    else
        log "(empty)"
    fi
    log "---- end of server log ----"
}

# Prints a loopback TCP port that nothing is listening on. Bash's /dev/tcp connects; a
# refused connection means the port is free. (Another process could still take it before
# the server binds; the readiness check would then fail loudly.)
find_free_port() {
    local attempt port
    for attempt in $(seq 1 200); do
        port=$((20000 + (RANDOM * 32768 + RANDOM) % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return 0
        fi
    done
    die "no free loopback port found after $attempt attempts"
}

psql_admin() {
    PGCONNECT_TIMEOUT=5 PGOPTIONS="-c client_min_messages=warning" psql -h "$postgres_host" -p "$postgres_port" -U postgres \
        -d postgres -X -q -v ON_ERROR_STOP=1 "$@"
}

postgres_reachable() {
    command -v psql >/dev/null 2>&1 && psql_admin -c 'SELECT 1' >/dev/null 2>&1
}

# Drops and recreates the benchmark database so every run starts empty. WITH (FORCE)
# (PostgreSQL 13+) also ends connections a crashed earlier run may have left open.
reset_postgres_database() {
    psql_admin -c "DROP DATABASE IF EXISTS ${postgres_database} WITH (FORCE)"
    psql_admin -c "CREATE DATABASE ${postgres_database}"
}

# Waits until GET /ready answers 200. Fails early if the server process exits.
wait_until_ready() {
    local base_url="$1" deadline=$((SECONDS + ready_timeout_secs)) status
    while ((SECONDS < deadline)); do
        if ! process_running "$server_pid"; then
            log "server exited before becoming ready"
            return 1
        fi
        status="$(curl --silent --output /dev/null --write-out '%{http_code}' \
            --max-time 2 --noproxy '*' "$base_url/ready" || true)"
        if [[ "$status" == "200" ]]; then
            return 0
        fi
        sleep 0.25
    done
    log "server not ready after ${ready_timeout_secs}s (last GET /ready status: ${status:-none})"
    return 1
}
