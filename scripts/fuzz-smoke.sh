#!/usr/bin/env bash
# Builds every fuzz target once, then runs each for N seconds (default 15) from its
# committed seeds (fuzz/seeds/TARGET, and the dictionary seeds/TARGET.dict if there is
# one). Exits non-zero at the first target that
# crashes, naming it; the crashing input stays under fuzz/artifacts/TARGET/.
#   usage: scripts/fuzz-smoke.sh [SECONDS] [TARGET...]
# Needs cargo-fuzz (scripts/install-deps.sh installs it). Its flags are nightly ones:
# RUSTC_BOOTSTRAP lets the stable toolchain take them. The build keeps debug
# assertions and overflow checks on (cargo fuzz's default profile): an arithmetic
# overflow on hostile input is a finding.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
export RUSTC_BOOTSTRAP=1
PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin"

seconds=${1:-15}
shift || true
if [[ $# -gt 0 ]]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

cargo fuzz build
# Found inputs go to a scratch corpus, so a run leaves the committed seeds as they are.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for t in "${targets[@]}"; do
    mkdir -p "$scratch/$t" "artifacts/$t"
    seeds=()
    [[ -d seeds/$t ]] && seeds=("seeds/$t")
    dict=()
    [[ -f seeds/$t.dict ]] && dict=("-dict=seeds/$t.dict")
    echo "fuzz-smoke: $t for ${seconds}s"
    if ! cargo fuzz run "$t" "$scratch/$t" "${seeds[@]}" -- \
        -max_total_time="$seconds" -rss_limit_mb=1024 -malloc_limit_mb=256 \
        -timeout=10 -print_final_stats=1 "${dict[@]}" 2>"$scratch/$t.log"; then
        tail -n 60 "$scratch/$t.log" >&2
        echo "fuzz-smoke: FAILED: $t (input under fuzz/artifacts/$t/)" >&2
        exit 1
    fi
    grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|#[0-9]+ +DONE)' "$scratch/$t.log" |
        sed "s/^/fuzz-smoke: $t: /" || true
done
echo "fuzz-smoke: ${#targets[@]} targets, ${seconds}s each, no crash"
