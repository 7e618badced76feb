#!/usr/bin/env bash
# Builds a signed SWUpdate bundle (.swu) outside bitbake, with the steps of meta-swupdate's
# swupdate-common.bbclass (do_swuimage) that the edgeinfer-update recipe runs:
#   1. @@NAME@@ in sw-description replaced by the value given with -V NAME=VALUE (bitbake
#      variables in the recipe; an unknown name is an error here, not a warning);
#   2. $swupdate_get_sha256(FILE) replaced by the SHA-256 of FILE;
#   3. sw-description signed: `openssl cms -sign -signer CERT -inkey KEY -outform DER
#      -nosmimecap -binary` (SWUPDATE_SIGNING = "CMS") into sw-description.sig;
#   4. `cpio -ov -H crc --reproducible`: sw-description, sw-description.sig, then the files in
#      the order given (the recipe's SRC_URI files, then SWUPDATE_IMAGES).
# The A/B rehearsal (image/ab/run.sh) makes its bundles with it from image/ota/rpi/sw-description.
#
#   image/ota/mkswu.sh -o OUT.swu -s sw-description -k signer.key -c signer.pem \
#       [-V NAME=VALUE]... FILE...
set -euo pipefail
out="" desc="" key="" cert="" vars=()
while getopts "o:s:k:c:V:" opt; do
  case "$opt" in
  o) out="$OPTARG" ;;
  s) desc="$OPTARG" ;;
  k) key="$OPTARG" ;;
  c) cert="$OPTARG" ;;
  V) vars+=("$OPTARG") ;;
  *) echo "usage: mkswu.sh -o OUT.swu -s sw-description -k KEY -c CERT [-V NAME=VALUE]... FILE..." >&2; exit 64 ;;
  esac
done
shift $((OPTIND - 1))
[[ -n "$out" && -n "$desc" && -n "$key" && -n "$cert" ]] || { echo "mkswu.sh: -o, -s, -k and -c are required" >&2; exit 64; }
for f in "$@"; do [[ -f "$f" ]] || { echo "mkswu.sh: $f: no such file" >&2; exit 66; }; done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
declare -A value=()
for v in "${vars[@]}"; do value["${v%%=*}"]="${v#*=}"; done
# 1. and 2., line by line as the class does.
while IFS= read -r line || [[ -n "$line" ]]; do
  while [[ "$line" =~ @@([A-Za-z0-9_]+)@@ ]]; do
    name="${BASH_REMATCH[1]}"
    [[ -v "value[$name]" ]] || { echo "mkswu.sh: sw-description uses @@$name@@, not given with -V" >&2; exit 65; }
    line="${line//"@@$name@@"/"${value[$name]}"}"
  done
  while [[ "$line" =~ \$swupdate_get_sha256\(([^\)]+)\) ]]; do
    file="${BASH_REMATCH[1]}" path=""
    for f in "$@"; do [[ "$(basename "$f")" == "$file" ]] && path="$f"; done
    [[ -n "$path" ]] || { echo "mkswu.sh: sw-description hashes $file, which is not in the bundle" >&2; exit 65; }
    sum=$(sha256sum "$path" | cut -d' ' -f1)
    line="${line//"\$swupdate_get_sha256($file)"/$sum}"
  done
  printf '%s\n' "$line"
done < "$desc" > "$work/sw-description"
# 3.
openssl cms -sign -in "$work/sw-description" -out "$work/sw-description.sig" \
  -signer "$cert" -inkey "$key" -outform DER -nosmimecap -binary
# 4.
names=(sw-description sw-description.sig)
for f in "$@"; do
  n=$(basename "$f")
  ln -s "$(realpath "$f")" "$work/$n"
  names+=("$n")
done
(cd "$work" && printf '%s\n' "${names[@]}" | cpio -o -L -H crc --reproducible --quiet) > "$out.tmp"
mv "$out.tmp" "$out"
