#!/usr/bin/env bash
# Generates a DEVELOPMENT signing setup for update bundles (SWUpdate CMS signatures), outside
# the repository: never commit a private key. Production keys live in the release pipeline's
# HSM / secret store; only CA certificates go into the image.
#
#   image/keys/gen-dev-keys.sh [DIR] [NAME]     default DIR: build/keys (where the kas files
#                                               look), NAME: edgeinfer-dev
#
# Writes, in DIR:
#   swupdate-ca.key / swupdate-ca.pem          a CA (EC P-256, 10 years): the certificate the
#                                              image trusts (/usr/share/swupdate/swupdate-ca.pem)
#   swupdate-signer.key / swupdate-signer.pem  the signing key and its certificate, issued by
#                                              that CA with extendedKeyUsage=codeSigning (the
#                                              purpose swupdate.cfg asks for); bundles are signed
#                                              with these (SWUPDATE_CMS_KEY / SWUPDATE_CMS_CERT)
#
# Key rotation: make a second DIR with this script (a new CA and signer), ship an image whose
# SWUPDATE_CA_CERTS lists both CA certificates, switch the bundles' signer to the new key once
# the fleet runs that image, then drop the old CA from the next image. The A/B rehearsal
# (image/ab/run.sh) signs its bundles across such a rotation.
#
# Refuses to overwrite existing keys and refuses a DIR inside a git work tree unless ignored.
set -euo pipefail
dir="${1:-build/keys}"
name="${2:-edgeinfer-dev}"
mkdir -p "$dir"
if [[ -e "$dir/swupdate-ca.key" || -e "$dir/swupdate-signer.key" ]]; then
  echo "exists: $dir/swupdate-ca.key (delete the directory's keys to make a new set)"; exit 0
fi
if git -C "$dir" rev-parse --is-inside-work-tree >/dev/null 2>&1 \
   && ! git -C "$dir" check-ignore -q "$dir/swupdate-signer.key"; then
  echo "error: $dir is inside a git work tree and not ignored; pick another DIR" >&2
  exit 1
fi
umask 077
cd "$dir"
openssl ecparam -name prime256v1 -genkey -noout -out swupdate-ca.key
openssl req -new -x509 -key swupdate-ca.key -sha256 -days 3650 -subj "/CN=$name update CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out swupdate-ca.pem 2>/dev/null
openssl ecparam -name prime256v1 -genkey -noout -out swupdate-signer.key
openssl req -new -key swupdate-signer.key -subj "/CN=$name bundle signer" -out signer.csr 2>/dev/null
printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=codeSigning\n' > signer.ext
openssl x509 -req -in signer.csr -CA swupdate-ca.pem -CAkey swupdate-ca.key -CAcreateserial \
  -sha256 -days 1825 -extfile signer.ext -out swupdate-signer.pem 2>/dev/null
rm -f signer.csr signer.ext swupdate-ca.srl
chmod 0644 swupdate-ca.pem swupdate-signer.pem
echo "development CA (the image trusts it): $dir/swupdate-ca.pem"
echo "signing key and certificate (SWUPDATE_CMS_KEY / SWUPDATE_CMS_CERT): $dir/swupdate-signer.key $dir/swupdate-signer.pem"
