#!/usr/bin/env bash
# Static, stripped edgeinfer binaries for the device targets.
#
#   tools/build-static.sh [aarch64|x86_64|all] [--features F] [--no-default-features]
#
# Output: dist/edgeinfer-<target> (stripped) and dist/edgeinfer-<target>.debug (unstripped), with
# `file` output and sizes printed. Uses the release profile (fat LTO, one codegen unit,
# panic=abort). The device build leaves the demo broker out and uses mimalloc instead of musl's
# malloc (--no-default-features --features mimalloc; see the README's allocator measurements)
# unless cargo flags are given. Add `multithread` for the pipeline key `threads` > 1: it costs
# ~4.2 MB on aarch64 (22.0 MB stripped with it, 17.8 MB without; see
# docs/performance/inference.md), so device images opt in.
#
# Toolchain (installed on first use, cached outside the clone):
# - `rustup target add <arch>-unknown-linux-musl`;
# - zig (from PyPI's `ziglang`) as the C compiler for tract's kernels and ring, through a small
#   wrapper that drops the `--target=` argument cc passes and maps `-march=armv8.N-a+feat` to
#   zig's `-mcpu=generic+v8_Na+feat` (`+fp16` -> `+fullfp16`), without which tract would
#   silently lose its fp16/SVE kernels;
# - rust-lld as the linker, against Rust's self-contained musl.
set -euo pipefail
cd "$(dirname "$0")/.."

which_targets="${1:-all}"
shift || true
cargo_flags=("$@")
if [[ ${#cargo_flags[@]} -eq 0 ]]; then cargo_flags=(--no-default-features --features mimalloc); fi

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/edgeinfer/target}"
tools="${EDGEINFER_TOOLS:-$HOME/.cache/edgeinfer/toolchain}"
mkdir -p "$tools/bin" dist

# zig from PyPI, installed into the cache.
zig="$tools/ziglang/ziglang/zig"
if [[ ! -x "$zig" ]]; then
  echo "== installing zig (PyPI ziglang) into $tools/ziglang"
  python3 -m pip install -q --target "$tools/ziglang" ziglang
fi

# cc wrapper per target: zig cc with the argument fix-ups.
make_cc() {
  local triple="$1" wrapper="$tools/bin/zigcc-$1"
  cat > "$wrapper" <<WRAP
#!/usr/bin/env bash
args=()
for a in "\$@"; do
  case "\$a" in
    --target=*|-target) continue ;;
    -march=armv8*)
      v="\${a#-march=armv}"; base="\${v%%+*}"; feats=""
      [[ "\$v" == *+* ]] && feats="+\${v#*+}"
      base="\${base%-a}"; base="v\${base//./_}a"
      feats="\${feats//+fp16/+fullfp16}"
      args+=("-mcpu=generic+\${base}\${feats}") ;;
    *) args+=("\$a") ;;
  esac
done
exec "$zig" cc -target $triple "\${args[@]}"
WRAP
  chmod +x "$wrapper"
  cat > "$tools/bin/zigar" <<WRAP
#!/usr/bin/env bash
exec "$zig" ar "\$@"
WRAP
  chmod +x "$tools/bin/zigar"
  echo "$wrapper"
}

build() {
  local arch="$1" target="$1-unknown-linux-musl" zig_triple="$1-linux-musl"
  rustup target list --installed | grep -qx "$target" || rustup target add "$target"
  local cc; cc=$(make_cc "$zig_triple")
  local up; up=$(echo "$target" | tr 'a-z-' 'A-Z_')
  local low; low=$(echo "$target" | tr '-' '_')
  echo "== building $target (${cargo_flags[*]})"
  env "CC_$low=$cc" "AR_$low=$tools/bin/zigar" \
    "CARGO_TARGET_${up}_LINKER=rust-lld" \
    "CARGO_TARGET_${up}_RUSTFLAGS=-C linker-flavor=ld.lld -C target-feature=+crt-static" \
    cargo build --release --locked -p edgeinfer --bin edgeinfer --target "$target" "${cargo_flags[@]}"
  local out="$CARGO_TARGET_DIR/$target/release/edgeinfer"
  cp "$out" "dist/edgeinfer-$target.debug"
  local strip=strip
  if [[ "$arch" == aarch64 ]]; then
    strip=aarch64-linux-gnu-strip
    command -v "$strip" >/dev/null || {
      echo "== installing binutils-aarch64-linux-gnu (strip)"
      apt-get install -y -qq binutils-aarch64-linux-gnu >/dev/null
    }
  fi
  "$strip" -o "dist/edgeinfer-$target" "$out"
  file "dist/edgeinfer-$target"
  # x86_64 musl links static-pie by default: static, position independent.
  if ! file "dist/edgeinfer-$target" | grep -Eq "statically linked|static-pie linked"; then
    echo "error: dist/edgeinfer-$target is not statically linked"; exit 1
  fi
  printf '%s: %s bytes stripped (%s unstripped)\n' "$target" \
    "$(stat -c %s "dist/edgeinfer-$target")" "$(stat -c %s "dist/edgeinfer-$target.debug")"
}

case "$which_targets" in
  aarch64) build aarch64 ;;
  x86_64) build x86_64 ;;
  all) build x86_64; build aarch64 ;;
  *) echo "usage: $0 [aarch64|x86_64|all] [cargo flags]"; exit 64 ;;
esac
