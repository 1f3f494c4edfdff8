#!/bin/sh
# The main job end to end: build debian-12-minimal from its shipped recipe, make a throwaway signing key,
# publish the template into a signed repository, audit it, check it the way a node admin with only gpgv and
# sha256sum would, serve it on 127.0.0.1, and fetch and verify it into a template cache with the pinned key.
set -eu
PYTHON=${PYTHON:-python3}
OUT=${OUT:-out/demo}
CACHE=${TMPLBUILD_CACHE_DIR:-/var/cache/tmplbuild}
WORK=$(mktemp -d /tmp/tmplbuild-demo.XXXXXX)
SERVER_PID=
cleanup() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null
    gpgconf --homedir "$WORK/gnupg" --kill all 2>/dev/null || true
}
trap cleanup EXIT
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
echo "### 6. serve the repository on 127.0.0.1 (gunicorn)"
tb serve "$WORK/repo" --host 127.0.0.1 --port 0 > "$WORK/serve.log" 2>&1 &
SERVER_PID=$!
url=
for _ in $(seq 100); do
    url=$(sed -n 's/.* on \(http:[^,]*\),.*/\1/p' "$WORK/serve.log" | head -n 1)
    [ -n "$url" ] && break
    sleep 0.1
done
[ -n "$url" ] || { cat "$WORK/serve.log"; exit 1; }
grep -m 1 "^serving" "$WORK/serve.log" || true

echo
echo "### 7. a node admin fetches it into a template cache, checked against the pinned key ($WORK/cache)"
mkdir -p "$WORK/cache"
export TMPLBUILD_STATE_DIR="$WORK/state" TMPLBUILD_CONFIG_DIR="$WORK/config"
tb remote add demo "$url" --key "$WORK/keys/demo.asc" --fingerprint "$fpr"
tb list --remote demo
tb fetch debian-12-minimal --remote demo --dest "$WORK/cache"
tb verify "$WORK/cache"/debian-12-minimal_*_amd64.tar.zst --remote demo
echo
echo "done: $(ls "$WORK"/cache/*.tar.zst) fetched and verified; repository in $WORK/repo"
