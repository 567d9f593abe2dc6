#!/usr/bin/env bash
# The control plane under a fleet's heartbeats (issue 14): 10,000 simulated agents and
# 20 process servers, each enrolled through the real API with its own key, heartbeating
# over mutual TLS against one `ferry control-plane` pinned to one CPU (the load
# generator on another). First on SQLite, then on PostgreSQL (the throwaway cluster of
# scripts/test-services.sh, which runs with fsync=off: its figures leave out the WAL
# sync that SQLite's include). docs/benchmarks.md records the figures.
#
#   scripts/bench-control-plane.sh [WORK_DIR] [ferry-bench control-plane options]
#
# The SQLite state directory and the enrolled identities are kept under WORK_DIR and
# reused by later runs; PostgreSQL's cluster is new each run, so they are enrolled
# again there. Each run ends with the line:
#   control-plane DB: 10000 agents every 5 s: X heartbeats/s, p99 Y ms, Z per CP CPU second, ...
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-target/bench-control-plane}
shift || true
mkdir -p "$work"
work=$(cd "$work" && pwd)

cargo build --release -q -p ferry -p ferry-bench
ferry=$PWD/target/release/ferry
bench=$PWD/target/release/ferry-bench
# Each simulated agent keeps a connection open, as real ones do: both processes need a
# descriptor apiece.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

"$bench" control-plane --ferry "$ferry" --work "$work" "$@"

services=$work/services
scripts/test-services.sh start "$services" >/dev/null
trap 'scripts/test-services.sh stop "$services" >/dev/null' EXIT
# shellcheck disable=SC1091
source "$services/env"
rm -rf "$work/postgres"
"$bench" control-plane --ferry "$ferry" --work "$work" --database "$FERRY_TEST_DATABASE" "$@"
