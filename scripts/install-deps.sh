#!/usr/bin/env bash
# Installs what the tests and benchmarks need beyond the Rust toolchain, and only what is
# missing, so it is cheap to run before every test run:
#   Debian: qemu-utils (qemu-img, qemu-io, qemu-nbd), qemu-system-x86 (the boot test's
#           guest; the same QEMU release as qemu-utils, or apt removes one),
#           e2fsprogs (mkfs.ext4), restic and borgbackup (the seed benchmark's peers),
#           curl, util-linux (losetup), postgresql (the control plane's second
#           backend, tested), chromium (the dashboard's test opens it headless)
#   npm:    azurite 3.37.0 (Azure Blob emulator)
#   cargo:  s3s-fs 0.14.1 (S3 emulator; building it takes a few minutes), cargo-fuzz
# Quiet on success; a failing step prints its full output.
set -euo pipefail

AZURITE_VERSION=3.37.0
S3S_FS_VERSION=0.14.1
CARGO_BIN=${CARGO_HOME:-$HOME/.cargo}/bin
# mkfs.ext4 lives in sbin, which a non-root PATH may lack; cargo installs to CARGO_BIN.
PATH="$PATH:/usr/sbin:/sbin:$CARGO_BIN"

SUDO=()
[[ $(id -u) -eq 0 ]] || SUDO=(sudo)

# Runs a command with its output kept aside, shown only when it fails.
quiet() {
    local log rc=0
    log=$(mktemp)
    "$@" >"$log" 2>&1 || rc=$?
    if [[ $rc -ne 0 ]]; then
        echo "install-deps: failed ($rc): $*" >&2
        cat "$log" >&2
    fi
    rm -f "$log"
    return "$rc"
}

command -v cargo >/dev/null || { echo "install-deps: no cargo; install Rust (rustup) first" >&2; exit 1; }

# Debian packages, named by the command each provides.
declare -A apt_for=([qemu-img]=qemu-utils [qemu-system-x86_64]=qemu-system-x86
    [mkfs.ext4]=e2fsprogs [restic]=restic [borg]=borgbackup [curl]=curl [losetup]=util-linux
    [chromium]=chromium)
command -v npm >/dev/null || apt_for[npm]="nodejs npm"
missing=()
for cmd in "${!apt_for[@]}"; do
    if ! command -v "$cmd" >/dev/null; then
        read -ra pkgs <<<"${apt_for[$cmd]}"
        missing+=("${pkgs[@]}")
    fi
done
# PostgreSQL's server (the control plane's second backend): Debian keeps pg_ctl off PATH.
compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null || missing+=(postgresql)
if [[ ${#missing[@]} -gt 0 ]]; then
    echo "install-deps: apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    quiet "${SUDO[@]}" apt-get update
    quiet "${SUDO[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
fi

# Azurite: the exact version, since its behaviour (and accepted API versions) moves.
if [[ $(azurite-blob --version 2>/dev/null) != "$AZURITE_VERSION" ]]; then
    echo "install-deps: npm install -g azurite@$AZURITE_VERSION"
    quiet "${SUDO[@]}" npm install -g --no-audit --no-fund --loglevel=error "azurite@$AZURITE_VERSION"
fi

# s3s-fs: --locked builds it with the dependency versions it was published with.
if [[ $(s3s-fs --version 2>/dev/null) != "s3s-fs $S3S_FS_VERSION" ]]; then
    echo "install-deps: cargo install s3s-fs $S3S_FS_VERSION (a few minutes)"
    quiet cargo install --locked --force s3s-fs --version "$S3S_FS_VERSION" --features binary
fi

# rustfmt and clippy come with rustup's default profile, but not with every toolchain.
for component in rustfmt clippy; do
    sub=${component/rustfmt/fmt}
    if ! cargo "$sub" --version >/dev/null 2>&1 && command -v rustup >/dev/null; then
        echo "install-deps: rustup component add $component"
        quiet rustup component add "$component"
    fi
done

# cargo-fuzz for the decoders' fuzz targets (run with RUSTC_BOOTSTRAP on
# the stable toolchain, which is the only one a fresh machine has).
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "install-deps: cargo install cargo-fuzz (a minute or two)"
    quiet cargo install --locked cargo-fuzz
fi
