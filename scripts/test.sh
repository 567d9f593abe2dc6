#!/usr/bin/env bash
# The test command, for CI and developers alike, on a fresh machine too: installs what is
# missing, starts Azurite and s3s-fs unless the caller already did (.ci/run does), runs
# every workspace test (the replica's store tests also against Azurite and S3), builds the
# benchmarks so they cannot rot unnoticed, and runs each fuzz target briefly.
set -euo pipefail
cd "$(dirname "$0")/.."

section() { printf '\n==== %s ====\n' "$*"; }

section "dependencies"
bash scripts/install-deps.sh
# Installed tools off a non-root PATH: mkfs.ext4 (sbin) and s3s-fs (cargo's bin).
PATH="$PATH:/usr/sbin:/sbin:${CARGO_HOME:-$HOME/.cargo}/bin"

if [[ -z ${FERRY_TEST_AZURE_URL:-} || -z ${FERRY_TEST_S3_URL:-} ]]; then
    section "services"
    state=$(mktemp -d)
    trap 'bash scripts/test-services.sh stop "$state"; rm -rf "$state"' EXIT
    bash scripts/test-services.sh start "$state"
    # shellcheck disable=SC1091
    source "$state/env"
fi

section "cargo test --workspace"
# Every suite runs even after one fails, so a CI log shows all failures at once.
cargo test --workspace --no-fail-fast

section "cargo bench --workspace --no-run"
cargo bench --workspace --no-run

section "fuzz: every decoder's target, 15 seconds each"
bash scripts/fuzz-smoke.sh 15
