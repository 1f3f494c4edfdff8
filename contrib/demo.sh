#!/bin/sh
# The main job, as far as it exists today: build debian-12-minimal from its shipped recipe, make a throwaway
# signing key, publish the template into a signed repository, audit it, and check it the way a node admin
# with only gpgv and sha256sum would. Serving and fetching join here as they land (see the README).
set -eu
PYTHON=${PYTHON:-python3}
OUT=${OUT:-out/demo}
CACHE=${TMPLBUILD_CACHE_DIR:-/var/cache/tmplbuild}
WORK=$(mktemp -d /tmp/tmplbuild-demo.XXXXXX)
trap 'gpgconf --homedir "$WORK/gnupg" --kill all 2>/dev/null || true' EXIT
tb() { "$PYTHON" -m tmplbuild "$@"; }

echo "### 1. build debian-12-minimal (package cache: $CACHE)"
tb build debian-12-minimal --out "$OUT" --cache-dir "$CACHE" --force
manifest=$(ls "$OUT"/debian-12-minimal_*_amd64.manifest.json | tail -n 1)

echo
echo "### 2. a throwaway signing key, in its own GNUPGHOME outside the project ($WORK/gnupg)"
fpr=$(tb key generate --name "tmplbuild demo <demo@example.invalid>" --gnupghome "$WORK/gnupg" --expire 1d \
      --out "$WORK/keys/demo.asc")
echo "fingerprint $fpr"

echo
echo "### 3. a signed repository, and the template published into it ($WORK/repo)"
tb repo init "$WORK/repo" --key "$fpr" --gnupghome "$WORK/gnupg" --id tmplbuild-demo
tb publish "$manifest" --repo "$WORK/repo" --key "$fpr" --gnupghome "$WORK/gnupg"

echo
echo "### 4. audit: every file, hash and signature, against the pinned public key"
tb repo verify "$WORK/repo" --key "$WORK/keys/demo.asc"

echo
echo "### 5. what a node admin without tmplbuild can check: gpgv + sha256sum -c"
tb key export --key "$fpr" --gnupghome "$WORK/gnupg" --out-dir "$WORK/keys" >/dev/null
dir=$(dirname "$(ls "$WORK"/repo/templates/debian-12-minimal/*/*.tar.zst | tail -n 1)")
(cd "$dir" && gpgv --keyring "$WORK/keys/$fpr.gpg" SHA256SUMS.gpg SHA256SUMS && sha256sum -c SHA256SUMS)
echo
echo "done: $(ls "$dir"/*.tar.zst) verified; repository in $WORK/repo"
