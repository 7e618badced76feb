#!/usr/bin/env bash
# Resolves the hawkBit server and MariaDB image tags to content digests and prints the
# --env-file for docker-compose.yml (HAWKBIT_IMAGE=repo@sha256:..., MARIADB_IMAGE=...), so that a
# deployment runs exactly the images that were reviewed. Needs a registry and docker buildx (or
# skopeo). Review the new digests (release notes, CVEs) before committing an images.env.
#
#   image/hawkbit/pin-images.sh [HAWKBIT_TAG] [MARIADB_TAG] > image/hawkbit/images.env
#   defaults: the tags named below; pass the release you reviewed.
set -euo pipefail
hawkbit="hawkbit/hawkbit-update-server:${1:-latest-mysql}"
mariadb="mariadb:${2:-11}"
digest() {
  if command -v skopeo >/dev/null 2>&1; then
    skopeo inspect --format '{{.Digest}}' "docker://$1"
  else
    docker buildx imagetools inspect --format '{{json .Manifest}}' "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["digest"])'
  fi
}
echo "# Resolved $(date -u +%Y-%m-%dT%H:%M:%SZ) from $hawkbit and $mariadb"
echo "HAWKBIT_IMAGE=${hawkbit%%:*}@$(digest "$hawkbit")"
echo "MARIADB_IMAGE=${mariadb%%:*}@$(digest "$mariadb")"
