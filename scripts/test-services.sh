#!/usr/bin/env bash
# Local services for the test suite, on 127.0.0.1 only: Azurite (Azure Blob) and s3s-fs
# (S3), each with a `ferry-test` container / bucket, and a throwaway PostgreSQL cluster
# with a `ferry_test` database (the control plane's queries).
#
#   scripts/test-services.sh start STATE_DIR   # start, wait, create, verify; write STATE_DIR/env
#   scripts/test-services.sh stop  STATE_DIR   # stop what `start` started there
#
# Executed, it only touches STATE_DIR; `source STATE_DIR/env` afterwards. Sourced with
# `start`, it also sources the env file into the calling shell. Logs: STATE_DIR/*.log.
# Ports: the first free one from FERRY_AZURITE_PORT (10100), FERRY_S3_PORT (9100) and
# FERRY_PG_PORT (55432).

# The well-known Azurite account and key (public, documented by Microsoft; emulator only).
AZ_ACCOUNT=devstoreaccount1
AZ_KEY='Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=='
# s3s-fs checks SigV4 signatures against this fixed, local-only pair.
S3_ACCESS_KEY=ferry-test-access
S3_SECRET_KEY=ferry-test-secret
CONTAINER=ferry-test
WAIT_SECS=60

ts_die() { echo "test-services: $*" >&2; exit 1; }

# A port is taken when something accepts a connection on it.
ts_port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

ts_free_port() {
    local p
    for ((p = $1; p < $1 + 100; p++)); do
        ts_port_busy "$p" || { echo "$p"; return 0; }
    done
    ts_die "no free port in $1..$(($1 + 99))"
}

# One Shared Key signed request to Azurite, with node's built-in modules only (no npm
# packages, no openssl quoting games). Prints the HTTP status; the body goes to stderr
# when the status is not 2xx so a failure says why.
ts_az_request() { # METHOD PORT PATH?QUERY [BODY]
    node - "$AZ_ACCOUNT" "$AZ_KEY" "$@" <<'JS'
const [account, key, method, port, target, body = ''] = process.argv.slice(2);
const crypto = require('crypto'), http = require('http');
const url = new URL(`http://127.0.0.1:${port}${target}`);
const headers = { 'x-ms-date': new Date().toUTCString(), 'x-ms-version': '2021-08-06' };
if (method === 'PUT' && !url.searchParams.has('restype')) headers['x-ms-blob-type'] = 'BlockBlob';
const len = Buffer.byteLength(body);
// Shared Key string-to-sign for the Blob service (version 2015-02-21 and later).
const xms = Object.keys(headers).filter(h => h.startsWith('x-ms-')).sort()
    .map(h => `${h}:${headers[h]}\n`).join('');
const params = [...url.searchParams.keys()].sort()
    .map(k => `\n${k.toLowerCase()}:${url.searchParams.getAll(k).sort().join(',')}`).join('');
const toSign = [method, '', '', len ? String(len) : '', '', '', '', '', '', '', '', '']
    .join('\n') + '\n' + xms + `/${account}${url.pathname}` + params;
const sig = crypto.createHmac('sha256', Buffer.from(key, 'base64')).update(toSign, 'utf8').digest('base64');
headers['Authorization'] = `SharedKey ${account}:${sig}`;
headers['Content-Length'] = len;
const req = http.request(url, { method, headers }, res => {
    let out = '';
    res.on('data', d => out += d);
    res.on('end', () => {
        // 409 is "already exists", expected when a state dir is reused.
        if (res.statusCode >= 300 && res.statusCode !== 409) process.stderr.write(out + "\n");
        console.log(res.statusCode);
    });
});
req.on('error', e => { console.error(e.message); console.log(0); });
req.end(body);
JS
}

# One SigV4 signed request to s3s-fs through curl; prints the HTTP status. S3 wants
# x-amz-content-sha256, which curl (7.88) signs but does not add by itself.
ts_s3_request() { # PORT PATH?QUERY [curl args...]
    local port=$1 target=$2
    shift 2
    curl -sS -o /dev/null -w '%{http_code}' --aws-sigv4 "aws:amz:us-east-1:s3" \
        --user "$S3_ACCESS_KEY:$S3_SECRET_KEY" -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" \
        "$@" "http://127.0.0.1:$port$target"
}

ts_start_failed() { # STATE_DIR
    local log
    for log in "$1/azurite.log" "$1/s3s-fs.log"; do
        [[ -s $log ]] && { echo "---- tail of $log" >&2; tail -n 30 "$log" >&2; }
    done
    ts_stop "$1"
}

# Waits until PID serves HTTP on PORT; on death or timeout shows the log and fails.
ts_wait_http() { # NAME PID PORT LOG
    local i
    for ((i = 0; i < WAIT_SECS * 4; i++)); do
        kill -0 "$2" 2>/dev/null || ts_die "$1 exited during start (log: $4)"
        curl -s -o /dev/null --max-time 2 "http://127.0.0.1:$3/" && return 0
        sleep 0.25
    done
    ts_die "$1 did not answer on 127.0.0.1:$3 within ${WAIT_SECS}s (log: $4)"
}

ts_expect() { # WHAT WANTED_STATUS... -- ACTUAL
    local what=$1 got=${*: -1} w
    shift
    for w in "$@"; do
        [[ $w == -- ]] && break
        [[ $w == "$got" ]] && return 0
    done
    ts_die "$what: HTTP $got"
}

ts_start() {
    local dir=$1 az_port s3_port az_pid s3_pid
    # Installed tools that a fresh login shell may not have on PATH yet.
    PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin"
    for tool in azurite-blob s3s-fs node curl; do
        command -v "$tool" >/dev/null || ts_die "$tool not found: run scripts/install-deps.sh"
    done
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    # A second start into the same directory replaces the first rather than leaking it.
    ts_stop "$dir"
    mkdir -p "$dir/azurite" "$dir/s3/$CONTAINER"
    # Any failure from here on shows both logs and leaves nothing running.
    trap 'ts_start_failed "'"$dir"'"' EXIT

    az_port=$(ts_free_port "${FERRY_AZURITE_PORT:-10100}")
    # stdin/stdout detached so a caller capturing output is never held open by a service.
    azurite-blob --blobHost 127.0.0.1 --blobPort "$az_port" --location "$dir/azurite" \
        --silent --skipApiVersionCheck \
        </dev/null >"$dir/azurite.log" 2>&1 &
    az_pid=$!
    echo "$az_pid" >"$dir/azurite.pid"

    s3_port=$(ts_free_port "${FERRY_S3_PORT:-9100}")
    RUST_LOG=${RUST_LOG:-warn} s3s-fs --host 127.0.0.1 --port "$s3_port" \
        --access-key "$S3_ACCESS_KEY" --secret-key "$S3_SECRET_KEY" "$dir/s3" \
        </dev/null >"$dir/s3s-fs.log" 2>&1 &
    s3_pid=$!
    echo "$s3_pid" >"$dir/s3s-fs.pid"

    ts_wait_http azurite "$az_pid" "$az_port" "$dir/azurite.log"
    ts_wait_http s3s-fs "$s3_pid" "$s3_port" "$dir/s3s-fs.log"

    # object_store never creates containers; 409 means a previous run left it there.
    ts_expect "create Azurite container $CONTAINER" 201 409 -- \
        "$(ts_az_request PUT "$az_port" "/$AZ_ACCOUNT/$CONTAINER?restype=container")"

    # Check that both answer signed requests the way object_store sends them: a list,
    # and a put / get / delete round trip of a probe object (removed again).
    ts_expect "Azurite list $CONTAINER" 200 -- \
        "$(ts_az_request GET "$az_port" "/$AZ_ACCOUNT/$CONTAINER?restype=container&comp=list")"
    ts_expect "Azurite put probe" 201 -- \
        "$(ts_az_request PUT "$az_port" "/$AZ_ACCOUNT/$CONTAINER/.probe" probe)"
    ts_expect "Azurite get probe" 200 -- \
        "$(ts_az_request GET "$az_port" "/$AZ_ACCOUNT/$CONTAINER/.probe")"
    ts_expect "Azurite delete probe" 202 -- \
        "$(ts_az_request DELETE "$az_port" "/$AZ_ACCOUNT/$CONTAINER/.probe")"

    ts_expect "s3s-fs list $CONTAINER" 200 -- \
        "$(ts_s3_request "$s3_port" "/$CONTAINER?list-type=2")"
    ts_expect "s3s-fs put probe" 200 -- \
        "$(ts_s3_request "$s3_port" "/$CONTAINER/.probe" -X PUT --data-binary probe)"
    ts_expect "s3s-fs get probe" 200 -- \
        "$(ts_s3_request "$s3_port" "/$CONTAINER/.probe")"
    ts_expect "s3s-fs delete probe" 204 -- \
        "$(ts_s3_request "$s3_port" "/$CONTAINER/.probe" -X DELETE)"

    ts_start_pg "$dir"

    # What object_store's from_env builders and the test suite read. object_store adds
    # the account to AZURITE_BLOB_STORAGE_URL itself, so the URL carries no path.
    cat >"$dir/env" <<EOF
export AZURE_STORAGE_USE_EMULATOR=true
export AZURITE_BLOB_STORAGE_URL=http://127.0.0.1:$az_port
export AZURE_STORAGE_ACCOUNT_NAME=$AZ_ACCOUNT
export FERRY_TEST_AZURE_URL=az://$CONTAINER
export AWS_ACCESS_KEY_ID=$S3_ACCESS_KEY
export AWS_SECRET_ACCESS_KEY=$S3_SECRET_KEY
export AWS_REGION=us-east-1
export AWS_ENDPOINT=http://127.0.0.1:$s3_port
export AWS_ALLOW_HTTP=true
export FERRY_TEST_S3_URL=s3://$CONTAINER
export FERRY_TEST_REQUIRE_REMOTE=1
export FERRY_TEST_DATABASE=postgres://ferry@127.0.0.1:$(<"$dir/pg.port")/ferry_test
EOF
    trap - EXIT
    echo "test-services: Azurite on 127.0.0.1:$az_port (pid $az_pid), s3s-fs on 127.0.0.1:$s3_port (pid $s3_pid), PostgreSQL on 127.0.0.1:$(<"$dir/pg.port"); env in $dir/env"
}

# Stops one service by its pid file, checking the pid still names that service so a
# recycled pid is never killed; waits for it to go, then forces it.
ts_stop_one() { # PIDFILE NAME
    local pid cmd i
    [[ -f $1 ]] || return 0
    pid=$(<"$1")
    rm -f "$1"
    [[ $pid =~ ^[0-9]+$ ]] || return 0
    cmd=$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline") || return 0
    [[ $cmd == *"$2"* ]] || return 0
    kill "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 40; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.25
    done
    kill -9 "$pid" 2>/dev/null || true
}

# PostgreSQL's tools: Debian keeps them out of PATH, under its versioned directory.
ts_pg_bin() {
    local d
    for d in /usr/lib/postgresql/*/bin; do
        [[ -x $d/pg_ctl ]] && { echo "$d"; return 0; }
    done
    command -v pg_ctl >/dev/null && { dirname "$(command -v pg_ctl)"; return 0; }
    return 1
}

# Runs a PostgreSQL tool as the cluster's owner: initdb refuses root, so root runs
# them as the postgres user; anyone else runs them as themselves.
ts_pg() {
    if [[ $(id -u) -eq 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# A throwaway PostgreSQL cluster in DIR/pg on a free port, trusting loopback (it holds
# nothing but the control plane's test tables), with the database ferry_test.
ts_start_pg() {
    local dir=$1 bin port
    bin=$(ts_pg_bin) || ts_die "PostgreSQL not found: run scripts/install-deps.sh"
    port=$(ts_free_port "${FERRY_PG_PORT:-55432}")
    mkdir -p "$dir/pg"
    if [[ $(id -u) -eq 0 ]]; then
        # The cluster's owner must reach its directory through this one.
        chmod 711 "$dir"
        chown postgres "$dir/pg"
    fi
    ts_pg "$bin/initdb" -D "$dir/pg" -A trust -U ferry -N >"$dir/pg-init.log" 2>&1 ||
        { cat "$dir/pg-init.log" >&2; ts_die "initdb failed"; }
    ts_pg "$bin/pg_ctl" -D "$dir/pg" -w -l "$dir/pg/server.log" \
        -o "-p $port -c listen_addresses=127.0.0.1 -c unix_socket_directories=$dir/pg -c fsync=off" \
        start >/dev/null ||
        { cat "$dir/pg/server.log" >&2; ts_die "PostgreSQL did not start"; }
    echo "$port" >"$dir/pg.port"
    ts_pg "$bin/createdb" -h 127.0.0.1 -p "$port" -U ferry ferry_test ||
        ts_die "createdb ferry_test failed"
}

ts_stop_pg() {
    local bin
    [[ -f $1/pg/PG_VERSION ]] || return 0
    bin=$(ts_pg_bin) || return 0
    ts_pg "$bin/pg_ctl" -D "$1/pg" -m fast -w stop >/dev/null 2>&1 || true
}

ts_stop() {
    ts_stop_one "$1/azurite.pid" azurite
    ts_stop_one "$1/s3s-fs.pid" s3s-fs
    ts_stop_pg "$1"
}

ts_main() {
    [[ $# -eq 2 && ($1 == start || $1 == stop) ]] || ts_die "usage: $0 start|stop STATE_DIR"
    "ts_$1" "$2"
}

if [[ ${BASH_SOURCE[0]} != "$0" ]]; then
    # Sourced: run in a subshell so `exit` and `set -e` never reach the caller's shell.
    [[ $# -eq 0 ]] && return 0
    (set -euo pipefail; ts_main "$@") || return 1
    if [[ $1 == start ]]; then
        # shellcheck disable=SC1091
        source "$2/env"
    fi
else
    set -euo pipefail
    ts_main "$@"
fi
