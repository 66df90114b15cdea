#!/usr/bin/env bash
# The ARM builds, made and run on an x86_64 Debian machine (CI runs it from `.ci/run`):
#
# - cross-compiles `aarch64-unknown-linux-gnu` and `armv7-unknown-linux-gnueabihf` with the
#   host's Debian cross gcc against a private sysroot of Debian bullseye's glibc 2.31 (its
#   headers, its libraries and libgcc_s), so the binaries run on Debian and Raspberry Pi OS
#   bullseye (glibc 2.31) and everything newer, whatever cross glibc the host has;
# - proves it: no symbol of the binary needs a glibc version above 2.31 (`objdump -T`), and
#   everything below runs under qemu-user against bullseye's glibc 2.31 itself;
# - records each stripped size (aarch64 must stay at or below 6 MB);
# - runs the ARM binary itself under qemu-user: `validate` and the demo (the whole pipeline: a
#   capture replayed, the spool, an in-process ingest endpoint);
# - runs under qemu-user the unit tests (both targets) and, for aarch64, every test suite that
#   needs no other process (no broker, no second scangate; their HTTP server is in-process).
#
# Installing the toolchains needs root and apt (it adds bullseye as a low-priority apt source,
# used only to download the sysroot's packages). `cross` (Docker) stays the route for users:
# cross/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

targets=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  cat > /etc/apt/sources.list.d/scangate-bullseye-cross.sources <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bullseye
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  # Nothing is installed from bullseye: its packages are only downloaded for the sysroot.
  cat > /etc/apt/preferences.d/scangate-bullseye-cross <<'EOF'
Package: *
Pin: release n=bullseye
Pin-Priority: 100
EOF
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf \
    binutils-aarch64-linux-gnu binutils-arm-linux-gnueabihf qemu-user >/dev/null
fi
rustup target add "${targets[@]}" >/dev/null

fail() { echo "arm: $*" >&2; exit 1; }

# sysroot ARCH: bullseye's glibc 2.31 (libc6, libc6-dev, linux-libc-dev) and libgcc_s for
# Debian's cross architecture ARCH (arm64, armhf), unpacked once under target/arm-sysroot.
sysroot() {
  local dir=$PWD/target/arm-sysroot/$1
  if [ ! -f "$dir/.complete" ]; then
    rm -rf "$dir" && mkdir -p "$dir/debs"
    (cd "$dir/debs" && apt-get download -qq -o APT::Sandbox::User=root \
      "libc6-$1-cross/bullseye" "libc6-dev-$1-cross/bullseye" \
      "linux-libc-dev-$1-cross/bullseye" "libgcc-s1-$1-cross/bullseye") >&2 \
      || fail "cannot download bullseye's $1 glibc: add bullseye as an apt source (as root, this script does)"
    for deb in "$dir"/debs/*.deb; do dpkg-deb -x "$deb" "$dir"; done
    touch "$dir/.complete"
  fi
  echo "$dir"
}

for t in "${targets[@]}"; do
  case $t in
    aarch64-*) tool=aarch64-linux-gnu; arch=arm64; qemu=qemu-aarch64; max=6000000 ;;
    armv7-*) tool=arm-linux-gnueabihf; arch=armhf; qemu=qemu-arm; max=0 ;;
  esac
  root=$(sysroot "$arch")
  lib=$root/usr/$tool/lib
  env=$(echo "$t" | tr 'a-z-' 'A-Z_')
  # Linked and compiled against the sysroot: the libraries (-L, -B for the start files,
  # --sysroot so that libc.so's own paths point into it) and the headers (a newer glibc's
  # headers redirect calls to newer symbol versions). The unwind tables of our own code and of
  # the C libraries are left out (panics abort; about 260 KB less on aarch64). Linkers:
  # .cargo/config.toml.
  export "CARGO_TARGET_${env}_RUSTFLAGS=-C force-unwind-tables=no -C link-arg=--sysroot=$root -C link-arg=-B$lib/ -C link-arg=-L$lib"
  export "CFLAGS_${t//-/_}=-fno-asynchronous-unwind-tables -fno-unwind-tables --sysroot=$root -isystem $root/usr/$tool/include"
  # Tests and the binary run under qemu-user on bullseye's glibc itself.
  export "CARGO_TARGET_${env}_RUNNER=$qemu -L $root/usr/$tool"
  qemu=("$qemu" -L "$root/usr/$tool")
  echo "== $t: release build"
  cargo build -q --release --target "$t"
  bin=target/$t/release/scangate
  stripped=target/$t/release/scangate.stripped
  "$tool-strip" -o "$stripped" "$bin"
  size=$(stat -c %s "$stripped")
  newest=$("$tool-objdump" -T "$bin" | grep -oE 'GLIBC_[0-9]+(\.[0-9]+)+' | sort -uV | tail -1)
  echo "$t: stripped $size bytes; newest glibc symbol version $newest"
  # Every version reference at or below 2.31.
  [ "$(printf '%s\n' "$newest" GLIBC_2.31 | sort -V | tail -1)" = GLIBC_2.31 ] \
    || fail "$t needs $newest (above glibc 2.31)"
  if [ "$max" -gt 0 ] && [ "$size" -gt "$max" ]; then
    fail "$t: stripped binary is $size bytes, above $max"
  fi
  echo "== $t: the binary under qemu"
  "${qemu[@]}" "$bin" --version
  "${qemu[@]}" "$bin" validate --config config/scangate.toml
  demo=$(mktemp -d)
  (cd "$demo" && timeout 300 "${qemu[@]}" "$OLDPWD/$bin" demo --speed 50 > demo.log 2>&1) \
    || { cat "$demo/demo.log"; fail "$t: the demo failed under qemu"; }
  tail -3 "$demo/demo.log"
  rm -rf "$demo"
  # aarch64: the unit tests and every suite that needs no other process; armv7: the unit
  # tests (the suites' ARM-specific risks, alignment and 32-bit sizes, are in the units they
  # exercise; CI's time on 2 cores is the limit).
  case $t in
    aarch64-*) suites=(--test spool --test protocols --test golden --test suppress --test clock --test outage --test forwarder) ;;
    *) suites=() ;;
  esac
  echo "== $t: tests under qemu: --lib ${suites[*]}"
  cargo test -q --target "$t" --lib "${suites[@]}"
done
echo "arm: ok"
