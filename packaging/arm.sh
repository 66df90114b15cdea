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
# Installing the toolchains needs root and apt; the sysroot's packages are downloaded by their
# pinned SHA-256 (no apt source is added). `cross` (Docker) stays the route for users:
# cross/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

targets=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)
fail() { echo "arm: $*" >&2; exit 1; }
# Flags and runners are passed through environment variables that cargo splits at spaces.
case $PWD in *[[:space:]]*) fail "the checkout's path has a space in it ($PWD): move it" ;; esac
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf \
    binutils-aarch64-linux-gnu binutils-arm-linux-gnueabihf qemu-user curl ca-certificates >/dev/null
fi
rustup target add "${targets[@]}" >/dev/null
# qemu-user looks a library up on the host when it is not under its -L prefix: with the host's
# own ARM libraries installed (multiarch), a test run might not be on bullseye's glibc.
for multiarch in /lib/aarch64-linux-gnu/libc.so.6 /lib/arm-linux-gnueabihf/libc.so.6; do
  if [ -e "$multiarch" ]; then
    echo "arm: warning: $multiarch exists on this host; qemu runs may load it instead of the sysroot's" >&2
  fi
done

# The sysroots: Debian bullseye's glibc 2.31 (libc6, libc6-dev, linux-libc-dev) and libgcc_s,
# as Debian's cross packages, each pinned by its SHA-256 (as bullseye's signed package index
# gives it), fetched from Debian's mirror or, once bullseye has moved there, its archive.
bullseye_debs=(
  "arm64 c/cross-toolchain-base/libc6-arm64-cross_2.31-9cross4_all.deb ccd237814281910e72422a6e86a6ef7570105fc69119ff8fc82f6a4827a8a015"
  "arm64 c/cross-toolchain-base/libc6-dev-arm64-cross_2.31-9cross4_all.deb 4b88456f6913474587be547a865c6b42756b2031ca11ddf6285ea6ff4275a48d"
  "arm64 c/cross-toolchain-base/linux-libc-dev-arm64-cross_5.10.13-1cross4_all.deb 3a5c7920a299c88f69b7d64eb60fb6e65631cd57721a30ed60a2f6b7adf931d3"
  "arm64 g/gcc-10-cross/libgcc-s1-arm64-cross_10.2.1-6cross1_all.deb 2966823a38c100f77786a49f734d240c892fc86c473dbf1c862c23424900fd83"
  "armhf c/cross-toolchain-base/libc6-armhf-cross_2.31-9cross4_all.deb 4895ed1617de67ba831836f2f9ecab7878075267b34472328442ebd45268ecb2"
  "armhf c/cross-toolchain-base/libc6-dev-armhf-cross_2.31-9cross4_all.deb d4131c12320cea918d4c16860cfb5d227182189bfed0faf8ff1bf07f3dda17fe"
  "armhf c/cross-toolchain-base/linux-libc-dev-armhf-cross_5.10.13-1cross4_all.deb 3b042ac678796b1446b19da7991859c0cf3035335186ddae3929805864c95b58"
  "armhf g/gcc-10-cross/libgcc-s1-armhf-cross_10.2.1-6cross1_all.deb 7e1e5dd4576de94c06915af491dc829853a7e37bec5e1c3353b1e29e294916db"
)
mirrors=(https://deb.debian.org/debian https://archive.debian.org/debian)

# sysroot ARCH: unpacks ARCH's (arm64, armhf) packages under target/arm-sysroot/ARCH, once
# (again when the list above changes), and sets `root` to it. Called directly, not in $(…), so
# that any failure stops the script.
sysroot() {
  local arch=$1 dir=$PWD/target/arm-sysroot/$1 want entry a pool sum deb url
  want=$(printf '%s\n' "${bullseye_debs[@]}" | grep "^$arch " | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$dir/.complete" 2>/dev/null)" != "$want" ]; then
    rm -rf "$dir"
    mkdir -p "$dir/debs"
    for entry in "${bullseye_debs[@]}"; do
      read -r a pool sum <<<"$entry"
      [ "$a" = "$arch" ] || continue
      deb=$dir/debs/${pool##*/}
      for url in "${mirrors[@]}"; do
        curl -fsSL --retry 3 -o "$deb" "$url/pool/main/$pool" && break
        rm -f "$deb"
      done
      [ -f "$deb" ] || fail "cannot download ${pool##*/} from ${mirrors[*]}"
      echo "$sum  $deb" | sha256sum -c --quiet - || fail "${pool##*/}: its SHA-256 is not the pinned one"
      dpkg-deb -x "$deb" "$dir"
    done
    echo "$want" > "$dir/.complete"
  fi
  root=$dir
}

for t in "${targets[@]}"; do
  case $t in
    aarch64-*) tool=aarch64-linux-gnu; arch=arm64; qemu=qemu-aarch64; max=6000000 ;;
    armv7-*) tool=arm-linux-gnueabihf; arch=armhf; qemu=qemu-arm; max=0 ;;
  esac
  sysroot "$arch"
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
  versions=$("$tool-objdump" -T "$bin" | grep -oE 'GLIBC_[A-Za-z0-9_.]+' | sort -uV || true)
  newest=$(echo "$versions" | grep -E '^GLIBC_[0-9]+(\.[0-9]+)+$' | tail -1 || true)
  echo "$t: stripped $size bytes; newest glibc symbol version ${newest:-none}"
  # A dynamic binary that names glibc's versions, every one a number at or below 2.31 (a tag
  # such as GLIBC_ABI_DT_RELR comes only from a newer glibc's linking).
  [ -n "$newest" ] || fail "$t: no glibc symbol version found (not a dynamic glibc binary?)"
  if echo "$versions" | grep -vqE '^GLIBC_[0-9]+(\.[0-9]+)+$|^GLIBC_PRIVATE$'; then
    fail "$t needs $(echo "$versions" | grep -vE '^GLIBC_[0-9]+(\.[0-9]+)+$' | tr '\n' ' ')"
  fi
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
