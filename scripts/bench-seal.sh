#!/usr/bin/env bash
# Seal, rebuild and seed-vs-restic-and-borg benchmarks, each against a baseline timed in
# the same run (ferry-bench prints the machine, every stage and the ratios;
# docs/benchmarks.md records them). The test image is a 4 GiB ext4 file system holding
# about 2 GiB of real files (this machine's /usr and cargo sources), made once and cached.
#
#   scripts/bench-seal.sh [WORK_DIR]     needs: mkfs.ext4, restic, borg
# Prints the factors after 5 % of the blocks changed, then ends with:
#   seal: X MB/s per core, ceiling Y MB/s, ratio R; seed vs restic: Q x; seed vs borg: B x
set -euo pipefail
cd "$(dirname "$0")/.."
PATH="$PATH:/usr/sbin:/sbin"
work=${1:-target/bench}
mkdir -p "$work"
work=$(cd "$work" && pwd)
image=$work/ext4-4g.img

# The peers, and mkfs.ext4 when the image is still to be made: checked before the
# build, so a missing one costs seconds and names its Debian package.
need=(restic:restic borg:borgbackup)
[[ -f $image ]] || need+=(mkfs.ext4:e2fsprogs)
missing=() packages=()
for tool in "${need[@]}"; do
    if ! command -v "${tool%%:*}" >/dev/null; then
        missing+=("${tool%%:*}") packages+=("${tool#*:}")
    fi
done
if (( ${#missing[@]} )); then
    echo "bench-seal: ${missing[*]} not found; install with: apt-get install ${packages[*]}" >&2
    exit 1
fi

cargo build --release -q -p ferry -p ferry-bench

if [[ ! -f $image ]]; then
    echo "making $image (4 GiB ext4 with about 2 GiB of files)" >&2
    stage=$work/stage
    rm -rf "$stage" && mkdir -p "$stage"
    # Documentation, programs, shared libraries, a JVM, compilers, Rust sources: a
    # mix of text, binaries and already-compressed files, as on a real server.
    for src in /usr/share /usr/bin /usr/lib/x86_64-linux-gnu /usr/lib/jvm /usr/lib/gcc \
               "${CARGO_HOME:-$HOME/.cargo}/registry/src"; do
        [[ -d $src ]] || continue
        (( $(du -sm "$stage" | cut -f1) < 1900 )) || break
        cp -a --no-preserve=ownership "$src" "$stage/$(echo "$src" | tr / _)" 2>/dev/null || true
    done
    echo "staged $(du -sh "$stage" | cut -f1) of files" >&2
    truncate -s 4G "$image.tmp"
    mkfs.ext4 -q -F -d "$stage" "$image.tmp"
    mv "$image.tmp" "$image"
    rm -rf "$stage"
fi

# The seed-vs-peers run changes 5 % of the blocks: work on a copy.
cp --sparse=always "$image" "$work/run.img"
target/release/ferry-bench all --image "$work/run.img" --ferry target/release/ferry --work "$work/peers"
rm -f "$work/run.img"
