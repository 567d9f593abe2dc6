#!/usr/bin/env bash
# A recovery plan's test failover at fleet scale (issue 15): 20 real agents of 16 MiB
# disks, one process server, one recovery host and one control plane (--jobs-at-once 8),
# all on this host; a plan of two groups of 10 (max_parallel 4) test-failed-over to NBD
# and cleaned up, timed against one machine's test failover and cleanup alone in the
# same run (before and after the plan). Every test disk is compared with its source
# (qemu-img compare) and the recovery host must hold nothing after the cleanup, both
# outside the timing. docs/benchmarks.md records the figures.
#
#   scripts/bench-recovery-plan.sh [WORK_DIR] [ferry-bench recovery-plan options]
#   FERRY_BENCH_PROFILE=dev     (the dev profile, opt-level 1: no release build)
# Ends with:
#   recovery-plan: 20 machines took Rx one machine's drill (S s, mean of both); ...
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-target/bench-recovery-plan}
shift || true
mkdir -p "$work"
work=$(cd "$work" && pwd)

# The agents are written through NBD with qemu-io; the test disks are compared with
# qemu-img: checked before the build, naming the Debian package.
for tool in qemu-io qemu-img; do
    if ! command -v "$tool" >/dev/null; then
        echo "bench-recovery-plan: $tool not found; install with: apt-get install qemu-utils" >&2
        exit 1
    fi
done

profile=${FERRY_BENCH_PROFILE:-release}
case $profile in
release) cargo build --release -q -p ferry -p ferry-bench; dir=release ;;
dev) cargo build -q -p ferry -p ferry-bench; dir=debug ;;
*) echo "bench-recovery-plan: FERRY_BENCH_PROFILE is release or dev, not $profile" >&2; exit 1 ;;
esac
target=${CARGO_TARGET_DIR:-$PWD/target}
"$target/$dir/ferry-bench" recovery-plan --ferry "$target/$dir/ferry" --work "$work" "$@"
