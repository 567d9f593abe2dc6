#!/usr/bin/env bash
# The main job, on a fresh machine, with nothing but this repository and a Rust
# toolchain: build ferry, then
# 1. `ferry quickstart`: a control plane, and a process server and an agent enrolled
#    through it with one-time tokens, on loopback with a local store; writes through
#    the agent's NBD export, recovery points, failover to each, a byte comparison with
#    the disk at each point, and the machine's health and RPO from the control plane;
# 2. offline seeding: seed a sample disk image holding a real ext4 file system into
# a local blob store, change 5 % of its blocks, seed again (a checksum resync that sends
# only the changed blocks), then fail over to both recovery points as raw and fixed-VHD
# images and show that each rebuilt disk matches the image it was taken from.
#
#   scripts/demo.sh [WORK_DIR]      (default: a new temporary directory)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d -t ferry-demo.XXXXXX)}
mkdir -p "$work"
say() { printf '\n== %s\n' "$*"; }

say "building ferry (release)"
cargo build --release -q -p ferry
ferry=$PWD/target/release/ferry
store="file://$work/store"
key=$work/vault.key
image=$work/disk.img

say "quickstart: control plane, enrolled process server + agent on loopback, writes through NBD, points, failover, health and RPO"
rm -rf "$work/quickstart"
"$ferry" quickstart --dir "$work/quickstart"

say "a vault key and a 256 MiB sample disk"
rm -rf "$work/store" "$key" "$work"/out-*
"$ferry" keygen --out "$key"
rm -f "$image"
truncate -s 256M "$image"
if command -v mkfs.ext4 >/dev/null; then
    # A real file system with real files in it: this repository's tracked files and
    # the system's documentation.
    stage=$work/stage
    rm -rf "$stage" && mkdir -p "$stage/ferry"
    git ls-files -z | xargs -0 cp --parents -t "$stage/ferry" 2>/dev/null || true
    [[ -d /usr/share/doc ]] && cp -r /usr/share/doc "$stage/doc" 2>/dev/null || true
    mkfs.ext4 -q -F -d "$stage" "$image"
    echo "ext4 file system holding $(du -sh "$stage" | cut -f1) of files"
else
    # No e2fsprogs: write text and random data into a sparse image instead.
    for i in $(seq 0 7); do
        find . -name '*.rs' -exec cat {} + | dd of="$image" bs=1M seek=$((i * 24)) conv=notrunc status=none
        head -c 4M /dev/urandom | dd of="$image" bs=1M seek=$((i * 24 + 16)) conv=notrunc status=none
    done
    echo "mkfs.ext4 not found: wrote text and random blocks into a sparse image"
fi
cp --sparse=always "$image" "$work/first.img"

say "first seed: a full copy, zero blocks skipped"
first=$("$ferry" seed --store "$store" --key-file "$key" --machine demo --disk sda \
    --image "$image" --label first | tee /dev/stderr | tail -n 1)

say "changing 5 % of the disk's 64 KiB blocks"
blocks=$(( $(stat -c %s "$image") / 65536 ))
for _ in $(seq 1 $((blocks / 20))); do
    head -c 65536 /dev/urandom | dd of="$image" bs=64K seek=$((RANDOM * 32768 % blocks + RANDOM % blocks)) \
        conv=notrunc status=none 2>/dev/null || true
done

say "second seed: a checksum resync, only differing blocks travel"
second=$("$ferry" seed --store "$store" --key-file "$key" --machine demo --disk sda \
    --image "$image" --label second | tee /dev/stderr | tail -n 1)

say "recovery points"
"$ferry" points --store "$store" --machine demo

say "failover to each point, as raw and as fixed VHD"
status=0
for pair in "$first:$work/first.img" "$second:$image"; do
    point=${pair%%:*}
    want=${pair#*:}
    for format in raw vhd; do
        out=$work/out-$point-$format
        "$ferry" failover --store "$store" --key-file "$key" --machine demo --point "$point" \
            --format "$format" --out "$out" >/dev/null
        got=$out/sda.$format
        if [[ $format == raw ]]; then
            cmp -s "$want" "$got" && same=yes || same=no
        else
            # A fixed VHD is the raw disk followed by a 512-byte footer.
            cmp -s -n "$(stat -c %s "$want")" "$want" "$got" && same=yes || same=no
            if command -v qemu-img >/dev/null && [[ $same == yes ]]; then
                qemu-img compare -q -f raw -F vpc "$want" "$got" || same=no
            fi
        fi
        printf 'point %s  %-3s  %s  matches the source: %s\n' "$point" "$format" "$got" "$same"
        [[ $same == yes ]] || status=1
    done
done
du -sh "$work/store" | awk '{print "store size: " $1 " for a 256 MiB disk and two points"}'
if [[ $status == 0 ]]; then
    say "every rebuilt disk matches (work directory: $work)"
else
    say "MISMATCH: a rebuilt disk differs (work directory: $work)"
fi
exit $status
