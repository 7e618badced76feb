#!/usr/bin/env bash
# Generates the DEVELOPMENT key pair that signs update bundles (SWUpdate, RSA-4096), outside the
# repository: never commit a private key. Production bundles are signed in the release pipeline
# with a key held in an HSM / secret store; only its public half goes into the image.
#
#   image/keys/gen-dev-keys.sh [DIR]     default DIR: build/keys (where the kas files look)
#
# Writes DIR/swupdate-dev.key (private, 0600) and DIR/swupdate-dev.pem (public). Refuses to
# overwrite existing keys and refuses a DIR inside a git work tree other than an ignored path.
set -euo pipefail
dir="${1:-build/keys}"
mkdir -p "$dir"
key="$dir/swupdate-dev.key" pub="$dir/swupdate-dev.pem"
if [[ -e "$key" ]]; then echo "exists: $key (delete it to make a new pair)"; exit 0; fi
if git -C "$dir" rev-parse --is-inside-work-tree >/dev/null 2>&1 && ! git -C "$dir" check-ignore -q "$key"; then
  echo "error: $key would be inside a git work tree and not ignored; pick another DIR" >&2
  exit 1
fi
umask 077
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:4096 -out "$key"
openssl rsa -in "$key" -pubout -out "$pub"
chmod 0644 "$pub"
echo "development signing key: $key"
echo "public key (installed in the image as /usr/share/swupdate/swupdate.pem): $pub"
