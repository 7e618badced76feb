#!/usr/bin/env bash
# Offline validation of the Yocto layer (no network, no full build):
#   1. oelint-adv on every recipe of meta-edgeinfer (config: yocto/meta-edgeinfer/.oelint.cfg);
#   2. per machine, with the upstream layers as local git mirrors: kas checks out the locked
#      commits, `bitbake -p` parses every layer and `bitbake -n edgeinfer-image edgeinfer-update`
#      resolves the whole task graph (task count and time printed);
#   3. optionally (EDGEINFER_YOCTO_CHECK_LAYER=1, ~20 min) yocto-check-layer on meta-edgeinfer.
#
#   EDGEINFER_YOCTO_MIRRORS=/path/to/mirrors tools/yocto-check.sh [MACHINE...]
#
# EDGEINFER_YOCTO_MIRRORS holds bare git repositories named after the upstream ones (bitbake.git,
# openembedded-core.git, meta-openembedded.git, meta-raspberrypi.git, meta-tegra.git,
# meta-swupdate.git), fetched by whoever runs this; nothing here fetches them. Without them the
# parse step prints SKIPPED with the reason (CI has no network) and the script exits 0.
# bitbake refuses to run as root: as root, kas runs as EDGEINFER_YOCTO_USER (default "yocto").
# Work directory: EDGEINFER_YOCTO_WORKDIR (default ~/.cache/edgeinfer/yocto of that user).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
layer="$repo/yocto/meta-edgeinfer"
machines=("$@")
[[ ${#machines[@]} -gt 0 ]] || machines=(raspberrypi4-64 raspberrypi5 jetson-orin-nano-devkit)

# 1. oelint-adv: any finding fails.
if command -v oelint-adv >/dev/null 2>&1; then
  mapfile -t recipes < <(cd "$layer" && find . -name '*.bb' -o -name '*.bbappend' | sort)
  out=$(cd "$layer" && oelint-adv "${recipes[@]}" 2>&1 || true)
  if [[ -n "$out" ]]; then echo "FAIL: oelint-adv:"; echo "$out"; exit 1; fi
  echo "ok: oelint-adv clean on ${#recipes[@]} recipes and bbappends ($(oelint-adv --version 2>&1 | tail -1))"
else
  echo "SKIPPED: oelint-adv not installed (pip install oelint-adv)"
fi

# 2. Parse and dry-run per machine.
mirrors="${EDGEINFER_YOCTO_MIRRORS:-}"
if [[ -z "$mirrors" ]]; then
  echo "SKIPPED: bitbake parse/dry-run: EDGEINFER_YOCTO_MIRRORS is not set (no network here to fetch layers)"
  exit 0
fi
for r in bitbake openembedded-core meta-openembedded meta-raspberrypi meta-tegra meta-swupdate; do
  if ! git -C "$mirrors/$r.git" rev-parse -q --verify HEAD >/dev/null 2>&1 \
     && ! git -C "$mirrors/$r.git" rev-parse -q --verify refs/heads/master >/dev/null 2>&1; then
    echo "SKIPPED: bitbake parse/dry-run: no git mirror $mirrors/$r.git"
    exit 0
  fi
done

as_user=()
if [[ "$(id -u)" -eq 0 ]]; then
  user="${EDGEINFER_YOCTO_USER:-yocto}"
  id "$user" >/dev/null 2>&1 || { echo "SKIPPED: bitbake refuses root and user $user does not exist (useradd -m $user)"; exit 0; }
  as_user=(runuser -u "$user" --)
fi
home=$("${as_user[@]}" sh -c 'echo $HOME')
kas="${KAS:-$(command -v kas || true)}"
[[ -x "$home/venv/bin/kas" && -z "${KAS:-}" && ${#as_user[@]} -gt 0 ]] && kas="$home/venv/bin/kas"
[[ -n "$kas" ]] || { echo "SKIPPED: kas not installed (pip install kas)"; exit 0; }
work="${EDGEINFER_YOCTO_WORKDIR:-$home/.cache/edgeinfer/yocto}"
"${as_user[@]}" mkdir -p "$work"
src="$repo"
if [[ ${#as_user[@]} -gt 0 ]]; then
  # externalsrc hashes the source tree with git, writing a temporary index into the checkout's
  # git directory: the build user needs its own clone (of HEAD: commit what is to be checked).
  [[ -z "$(git -C "$repo" status --porcelain)" ]] || echo "note: uncommitted changes are not checked (the build user works on a clone of HEAD)"
  "${as_user[@]}" rm -rf "$work/edgeinfer"
  "${as_user[@]}" git clone -q "$repo" "$work/edgeinfer"
  src="$work/edgeinfer"
fi

# Upstream URL (as in the kas files) -> local mirror, one pair a line.
premirrors="https://github.com/openembedded/bitbake.git file://$mirrors/bitbake.git
https://github.com/openembedded/openembedded-core.git file://$mirrors/openembedded-core.git
https://github.com/openembedded/meta-openembedded.git file://$mirrors/meta-openembedded.git
https://github.com/agherzan/meta-raspberrypi.git file://$mirrors/meta-raspberrypi.git
https://github.com/OE4T/meta-tegra.git file://$mirrors/meta-tegra.git
https://github.com/sbabic/meta-swupdate.git file://$mirrors/meta-swupdate.git"

status=0
for m in "${machines[@]}"; do
  kasfile="$src/yocto/kas/$m.yml"
  [[ -f "$kasfile" ]] || { echo "FAIL: no kas file $kasfile"; status=1; continue; }
  log="$work/$m.log"
  start=$(date +%s)
  # The repository may belong to another user (root): let git (kas, bitbake) read it anyway.
  if "${as_user[@]}" env KAS_WORK_DIR="$work" KAS_BUILD_DIR="$work/build-$m" \
      KAS_PREMIRRORS="$premirrors" \
      GIT_CONFIG_COUNT=1 GIT_CONFIG_KEY_0=safe.directory GIT_CONFIG_VALUE_0='*' \
      "$kas" shell "$kasfile" -c '
        set -e
        printf "\nBB_NO_NETWORK = \"1\"\nBB_NUMBER_THREADS = \"2\"\n" >> conf/local.conf
        t0=$(date +%s); bitbake -p; t1=$(date +%s)
        bitbake -n edgeinfer-image edgeinfer-update; t2=$(date +%s)
        echo "TIMING parse=$((t1 - t0))s dryrun=$((t2 - t1))s"' > "$log" 2>&1; then
    tasks=$(grep -o 'Executing Tasks\|NOTE: Tasks Summary: Attempted [0-9]* tasks' "$log" | tail -1 | grep -o '[0-9]*' || true)
    timing=$(grep '^TIMING' "$log" | tail -1 | cut -d' ' -f2-)
    warnings=$(grep -c '^WARNING:' "$log" || true)
    echo "ok: $m: bitbake -p and bitbake -n edgeinfer-image edgeinfer-update: ${tasks:-?} tasks ($timing, total $(( $(date +%s) - start ))s, $warnings warnings; log $log)"
  else
    echo "FAIL: $m (log $log):"; grep -E '^(ERROR|FATAL)|Error|error:' "$log" | head -20; status=1
  fi
done

# 3. yocto-check-layer (slow): the first machine's configuration, with DISTRO = "nodistro":
#    the check asks that adding the layer changes no other recipe's signature, which holds with
#    the bbappends gated on our distro override and cannot hold with our distro selected (a
#    distro changes everything); and its world build of the dependency layers needs what our
#    distro opts out of (gobject-introspection-data: meta-python's python3-dasbus needs pygobject).
#    The kas build already lists meta-edgeinfer; it is removed first so the check adds it once.
if [[ "${EDGEINFER_YOCTO_CHECK_LAYER:-0}" == 1 && $status -eq 0 ]]; then
  m="${machines[0]}"
  start=$(date +%s)
  if "${as_user[@]}" env KAS_WORK_DIR="$work" KAS_BUILD_DIR="$work/build-$m" KAS_PREMIRRORS="$premirrors" \
      GIT_CONFIG_COUNT=1 GIT_CONFIG_KEY_0=safe.directory GIT_CONFIG_VALUE_0='*' \
      "$kas" shell "$src/yocto/kas/$m.yml" -c '
        printf "\nBB_NO_NETWORK = \"1\"\nDISTRO = \"nodistro\"\n" >> conf/local.conf
        bitbake-layers remove-layer "*/meta-edgeinfer" >/dev/null
        yocto-check-layer --no-auto-dependency --dependency $(bitbake-layers show-layers | awk "NR>3 && \$1 != \"edgeinfer\" {print \$2}") -- '"$src/yocto/meta-edgeinfer" \
      > "$work/check-layer.log" 2>&1; then
    echo "ok: yocto-check-layer meta-edgeinfer ($m, $(( $(date +%s) - start ))s): $(grep -E 'INFO: (meta-edgeinfer|SUMMARY)' "$work/check-layer.log" | tail -2 | tr '\n' ' ')"
  else
    echo "FAIL: yocto-check-layer (log $work/check-layer.log):"; grep -E 'FAIL|ERROR' "$work/check-layer.log" | head -20; status=1
  fi
fi
exit $status
