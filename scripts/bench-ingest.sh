#!/usr/bin/env bash
# The process server under load on loopback: generates certificates, starts a real
# `ferry process-server` per run, drives simulated agents over mutual TLS (blocks of a
# real ext4 image, zero and incompressible blocks, sequential and random mixes), and
# rebuilds every disk from the store afterwards to compare it with its model. Runs:
# full load, half load (ack latency), 80 % load, 1,000 connections (memory), and scaling: full load
# and then half of it on 1, 2, 4, ... shards, the server on n CPUs and the load
# generator's n threads on n others, as far as the host's CPUs go (one step on two
# CPUs, four on sixteen). The
# ceiling is TLS receive, zstd-1 and AES-256-GCM each timed alone on one core in the
# same run, before the first run and again after each, so a host that changes speed
# shows as a spread (a ratio whose ceiling moved over 10 % within its run says so).
# Each run also prints the RPO: the age of each agent's newest uploaded point, sampled
# at random moments (p50, p99, max), and the half- and 80 %-load runs end with a line
# that holds it to the goal (p99 <= point interval + 0.25 s).
#
#   scripts/bench-ingest.sh [SECONDS] [WORK_DIR]     (SECONDS of load per run, default 20)
#   FERRY_BENCH_STORE_DIR=DIR|cache-disk              (where the blob store goes)
# Ends with:
#   ingest: X MB/s, Y MB/s per server core-second, ceiling Z MB/s (mean of 2 timings,
#   spread S %), ratio R, p99 ack N ms, verify ok
set -euo pipefail
cd "$(dirname "$0")/.."
PATH="$PATH:/usr/sbin:/sbin"
seconds=${1:-20}
work=${2:-target/bench}
mkdir -p "$work"
work=$(cd "$work" && pwd)
image=$work/ext4-4g.img

# No peer runs here, but the image is made with mkfs.ext4 when neither image exists:
# checked before the build, naming the Debian package.
if [[ ! -f $image && ! -f $work/ext4-1g.img ]] && ! command -v mkfs.ext4 >/dev/null; then
    echo "bench-ingest: mkfs.ext4 not found; install with: apt-get install e2fsprogs" >&2
    exit 1
fi

cargo build --release -q -p ferry -p ferry-bench

if [[ ! -f $image ]]; then
    # Same image as scripts/bench-seal.sh; a smaller one is enough here.
    image=$work/ext4-1g.img
    if [[ ! -f $image ]]; then
        echo "making $image (1 GiB ext4 with about 600 MiB of files)" >&2
        stage=$work/stage-ingest
        rm -rf "$stage" && mkdir -p "$stage"
        for src in /usr/share /usr/lib/x86_64-linux-gnu "${CARGO_HOME:-$HOME/.cargo}/registry/src"; do
            [[ -d $src ]] || continue
            (( $(du -sm "$stage" | cut -f1) < 600 )) || break
            cp -a --no-preserve=ownership "$src" "$stage/$(echo "$src" | tr / _)" 2>/dev/null || true
        done
        truncate -s 1G "$image.tmp"
        mkfs.ext4 -q -F -d "$stage" "$image.tmp"
        mv "$image.tmp" "$image"
        rm -rf "$stage"
    fi
fi

# The blob store stands for another site: put it in memory when there is room, so its
# writes do not share the cache's disk. Beside the cache, their writeback every five
# seconds made the cache's syncs take 30-110 ms (half-load ack p99 80-120 ms instead of
# 1.4 ms: docs/benchmarks.md). FERRY_BENCH_STORE_DIR overrides; "cache-disk" keeps it
# beside the cache.
store_args=()
store_dir=${FERRY_BENCH_STORE_DIR:-}
if [[ -z $store_dir ]]; then
    free_kib=$(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 { print $4 }')
    if (( ${free_kib:-0} >= 8 * 1024 * 1024 )); then
        store_dir=/dev/shm/ferry-bench-store
    fi
fi
if [[ -n $store_dir && $store_dir != cache-disk ]]; then
    store_args=(--store-dir "$store_dir")
fi

# Each connection is a descriptor on both ends.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec target/release/ferry-bench ingest --image "$image" --ferry target/release/ferry \
    --work "$work/ingest" --seconds "$seconds" "${store_args[@]}"
