#!/usr/bin/env bash
# The ARM builds, made and run on an x86_64 Debian machine (CI runs it from `.ci/run`):
#
# - cross-compiles `aarch64-unknown-linux-gnu` and `armv7-unknown-linux-gnueabihf` with Debian
#   bullseye's cross toolchains (gcc 10, glibc 2.31), so the binaries run on Debian and
#   Raspberry Pi OS bullseye (glibc 2.31) and everything newer;
# - proves it: no symbol of the binary needs a glibc version above 2.31 (`objdump -T`);
# - records each stripped size (aarch64 must stay at or below 6 MB);
# - runs the ARM binary itself under qemu-user: `validate` and the demo (the whole pipeline: a
#   capture replayed, the spool, an in-process ingest endpoint);
# - runs under qemu-user the unit tests (both targets) and, for aarch64, every test suite that
#   needs no other process (no broker, no second scangate; their HTTP server is in-process).
#
# Installing the toolchains needs root and apt (a throwaway machine: it adds bullseye as a
# low-priority apt source). `cross` (Docker) stays the route for users: cross/README.md.
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
  # Nothing comes from bullseye unless asked for (-t bullseye below).
  cat > /etc/apt/preferences.d/scangate-bullseye-cross <<'EOF'
Package: *
Pin: release n=bullseye
Pin-Priority: 100
EOF
  apt-get update -qq
  # bullseye's cross gcc 10 and glibc 2.31 (-t: they and what they need come from bullseye);
  # the host's own binutils (bullseye's pin binutils-common to an older version). On a machine
  # that already has a newer Debian's cross packages these stay, and the glibc check below
  # fails: CI starts from a fresh machine.
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
  binutils=(binutils-aarch64-linux-gnu binutils-arm-linux-gnueabihf)
  if [ -n "$codename" ] && [ "$codename" != bullseye ]; then
    binutils=("${binutils[@]/%//$codename}")
  fi
  apt-get install -y -qq --no-install-recommends -t bullseye \
    gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf libc6-dev-arm64-cross libc6-dev-armhf-cross \
    "${binutils[@]}" >/dev/null
  apt-get install -y -qq --no-install-recommends qemu-user >/dev/null
fi
rustup target add "${targets[@]}" >/dev/null

# The unwind tables of our own code and of the C libraries are left out (panics abort; about
# 260 KB less on aarch64). Linkers and qemu runners: .cargo/config.toml.
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C force-unwind-tables=no"
export CARGO_TARGET_ARMV7_UNKNOWN_LINUX_GNUEABIHF_RUSTFLAGS="-C force-unwind-tables=no"
export CFLAGS_aarch64_unknown_linux_gnu="-fno-asynchronous-unwind-tables -fno-unwind-tables"
export CFLAGS_armv7_unknown_linux_gnueabihf="-fno-asynchronous-unwind-tables -fno-unwind-tables"

fail() { echo "arm: $*" >&2; exit 1; }
for t in "${targets[@]}"; do
  case $t in
    aarch64-*) tool=aarch64-linux-gnu; qemu=(qemu-aarch64 -L /usr/aarch64-linux-gnu); max=6000000 ;;
    armv7-*) tool=arm-linux-gnueabihf; qemu=(qemu-arm -L /usr/arm-linux-gnueabihf); max=0 ;;
  esac
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
