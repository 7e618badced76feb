#!/usr/bin/env bash
# Offline validation of the Yocto layer (no network, no full build):
#   1. oelint-adv on every recipe of meta-edgeinfer (config: yocto/meta-edgeinfer/.oelint.cfg);
#   2. per machine, with the upstream layers as local git mirrors: kas checks out the locked
#      commits and ONE bitbake run, `bitbake -g edgeinfer-image edgeinfer-update`, parses every
#      layer and computes the whole task graph (what `bitbake -n` would run; the task count and
#      times are printed); yocto/check-task-graph.py then asserts on that graph what the A/B
#      update path needs (Jetson: boot control and capsule recipes in the image, the update
#      depending on tegra-uefi-capsules:do_deploy; both: the OTA glue that installs
#      /etc/hwrevision, the SBOM/CVE tasks, ...);
#   3. optionally (EDGEINFER_YOCTO_CHECK_LAYER=1, ~20 min) yocto-check-layer on meta-edgeinfer.
#
#   EDGEINFER_YOCTO_MIRRORS=/path/to/mirrors tools/yocto-check.sh [--strict] [MACHINE...]
#
# EDGEINFER_YOCTO_MIRRORS holds bare git repositories named after the upstream ones (bitbake.git,
# openembedded-core.git, meta-openembedded.git, meta-raspberrypi.git, meta-tegra.git,
# meta-swupdate.git), fetched by whoever runs this; nothing here fetches them. A step that cannot
# run (no mirrors, no kas, no build user, no oelint-adv) prints SKIPPED with the reason; the
# script then exits 0, or 69 (EX_UNAVAILABLE) with --strict. A failed check exits 1.
# bitbake refuses to run as root: as root, kas runs as EDGEINFER_YOCTO_USER (default "yocto"),
# from its own clone of HEAD (commit what is to be checked). A checkout or mirrors owned by
# another user (root) are made git "safe.directory" entries in the build user's global git
# config (kas runs git with its own environment, so GIT_CONFIG_* variables do not reach it).
# Work directory: EDGEINFER_YOCTO_WORKDIR (default ~/.cache/edgeinfer/yocto of that user).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
layer="$repo/yocto/meta-edgeinfer"
strict=0
machines=()
for a in "$@"; do
  case "$a" in
  --strict) strict=1 ;;
  -*) echo "usage: tools/yocto-check.sh [--strict] [MACHINE...]" >&2; exit 64 ;;
  *) machines+=("$a") ;;
  esac
done
[[ ${#machines[@]} -gt 0 ]] || machines=(raspberrypi4-64 raspberrypi5 jetson-orin-nano-devkit)
skipped=0
skip() { echo "SKIPPED: $*"; skipped=$((skipped + 1)); }
finish() {
  local status="$1"
  if [[ $status -eq 0 && $skipped -gt 0 && $strict -eq 1 ]]; then
    echo "error: $skipped step(s) SKIPPED and --strict given"; exit 69
  fi
  exit "$status"
}

as_user=()
# The build user's home, as that user sees it.
# shellcheck disable=SC2016 # expanded by that user's shell
user_home() { "${as_user[@]}" sh -c 'echo "$HOME"'; }
if [[ "$(id -u)" -eq 0 ]]; then
  user="${EDGEINFER_YOCTO_USER:-yocto}"
  if id "$user" >/dev/null 2>&1; then as_user=(runuser -u "$user" --); else user=""; fi
fi

# 1. oelint-adv: any finding fails (the build user's venv has it when this machine's does not).
oelint=$(command -v oelint-adv || true)
if [[ -z "$oelint" && ${#as_user[@]} -gt 0 ]]; then
  h=$(user_home)
  [[ -x "$h/venv/bin/oelint-adv" ]] && oelint="$h/venv/bin/oelint-adv"
fi
if [[ -n "$oelint" ]]; then
  mapfile -t recipes < <(cd "$layer" && find . -name '*.bb' -o -name '*.bbappend' | sort)
  if ! out=$(cd "$layer" && "$oelint" "${recipes[@]}" 2>&1) || [[ -n "$out" ]]; then
    echo "FAIL: oelint-adv:"; echo "$out"; exit 1
  fi
  echo "ok: oelint-adv clean on ${#recipes[@]} recipes and bbappends ($("$oelint" --version 2>&1 | tail -1))"
else
  skip "oelint-adv not installed (pip install oelint-adv)"
fi

# 2. Parse and task graph per machine.
mirrors="${EDGEINFER_YOCTO_MIRRORS:-}"
if [[ -z "$mirrors" ]]; then
  skip "bitbake parse and task graph: EDGEINFER_YOCTO_MIRRORS is not set (no network here to fetch layers)"
  finish 0
fi
for r in bitbake openembedded-core meta-openembedded meta-raspberrypi meta-tegra meta-swupdate; do
  if ! git -c safe.directory='*' -C "$mirrors/$r.git" rev-parse -q --verify HEAD >/dev/null 2>&1 \
     && ! git -c safe.directory='*' -C "$mirrors/$r.git" rev-parse -q --verify refs/heads/master >/dev/null 2>&1; then
    skip "bitbake parse and task graph: no git mirror $mirrors/$r.git"
    finish 0
  fi
done
if [[ "$(id -u)" -eq 0 && ${#as_user[@]} -eq 0 ]]; then
  skip "bitbake parse and task graph: bitbake refuses root and user ${EDGEINFER_YOCTO_USER:-yocto} does not exist (useradd -m ${EDGEINFER_YOCTO_USER:-yocto})"
  finish 0
fi
home=$(user_home)
kas="${KAS:-$(command -v kas || true)}"
[[ -x "$home/venv/bin/kas" && -z "${KAS:-}" && ${#as_user[@]} -gt 0 ]] && kas="$home/venv/bin/kas"
if [[ -z "$kas" ]]; then skip "bitbake parse and task graph: kas not installed (pip install kas)"; finish 0; fi

# Repositories owned by someone else: trusted by the build user's git (once per path).
trust() {
  local p
  for p in "$@"; do
    "${as_user[@]}" git config --global --get-all safe.directory 2>/dev/null | grep -qxF "$p" \
      || "${as_user[@]}" git config --global --add safe.directory "$p"
  done
}
if [[ ${#as_user[@]} -gt 0 ]]; then
  for r in bitbake openembedded-core meta-openembedded meta-raspberrypi meta-tegra meta-swupdate; do
    trust "$mirrors/$r.git" "$(realpath "$mirrors/$r.git")"
  done
  trust "$repo" "$(git -C "$repo" rev-parse --path-format=absolute --git-dir)" \
    "$(git -C "$repo" rev-parse --path-format=absolute --git-common-dir)"
fi

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
  # shellcheck disable=SC2016 # expanded by the kas shell
  if "${as_user[@]}" env KAS_WORK_DIR="$work" KAS_BUILD_DIR="$work/build-$m" KAS_PREMIRRORS="$premirrors" \
      "$kas" shell "$kasfile" -c '
        set -e
        # (kas passes no environment of ours into this shell: the settings are spelled out.)
        printf "\nBB_NO_NETWORK = \"1\"\nBB_NUMBER_THREADS = \"2\"\n" >> conf/local.conf
        # The sbom-cve-check fragment sets the CVE database recipes to AUTOREV (the newest
        # databases at build time), which needs the network even to parse: offline they keep
        # the revisions their recipes pin (their tasks stay in the graph).
        for r in cvelist nvd; do
          rev=$(sed -n "s/^SRCREV = \"\(.*\)\"/\1/p" ../layers/openembedded-core/meta/recipes-devtools/sbom-cve-check/sbom-cve-check-update-$r-native_*.bb)
          [ -z "$rev" ] || printf "SRCREV:pn-sbom-cve-check-update-%s-native:forcevariable = \"%s\"\n" "$r" "$rev" >> conf/local.conf
        done
        t0=$(date +%s)
        bitbake -g edgeinfer-image edgeinfer-update
        echo "TIMING graph=$(( $(date +%s) - t0 ))s"' > "$log" 2>&1; then
    cp "$work/build-$m/task-depends.dot" "$work/$m.task-depends.dot" 2>/dev/null || true
    timing=$(grep '^TIMING' "$log" | tail -1 | cut -d' ' -f2-)
    warnings=$(grep -c '^WARNING:' "$log" || true)
    if graph=$(python3 "$repo/yocto/check-task-graph.py" "$m" "$work/$m.task-depends.dot" 2>&1); then
      echo "ok: $m: one parse + task graph of edgeinfer-image edgeinfer-update: $(echo "$graph" | head -1) ($timing, total $(( $(date +%s) - start ))s, $warnings warnings; log $log)"
      echo "$graph" | tail -n +2 | sed 's/^/    /'
    else
      echo "FAIL: $m: task graph assertions ($work/$m.task-depends.dot):"; printf '    %s\n' "${graph//$'\n'/$'\n'    }"; status=1
    fi
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
  # shellcheck disable=SC2016 # expanded by the kas shell
  if "${as_user[@]}" env KAS_WORK_DIR="$work" KAS_BUILD_DIR="$work/build-$m" KAS_PREMIRRORS="$premirrors" \
      LAYER="$src/yocto/meta-edgeinfer" "$kas" shell "$src/yocto/kas/$m.yml" -c '
        printf "\nBB_NO_NETWORK = \"1\"\nDISTRO = \"nodistro\"\n" >> conf/local.conf
        bitbake-layers remove-layer "*/meta-edgeinfer" >/dev/null
        yocto-check-layer --no-auto-dependency --dependency $(bitbake-layers show-layers | awk "NR>3 && \$1 != \"edgeinfer\" {print \$2}") -- "$LAYER"' \
      > "$work/check-layer.log" 2>&1; then
    echo "ok: yocto-check-layer meta-edgeinfer ($m, $(( $(date +%s) - start ))s): $(grep -E 'INFO: (meta-edgeinfer|SUMMARY)' "$work/check-layer.log" | tail -2 | tr '\n' ' ')"
  else
    echo "FAIL: yocto-check-layer (log $work/check-layer.log):"; grep -E 'FAIL|ERROR' "$work/check-layer.log" | head -20; status=1
  fi
fi
finish $status
