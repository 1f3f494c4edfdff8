#!/bin/sh
# The main job end to end: build debian-12-minimal from its shipped recipe, make throwaway keys (a root key,
# kept apart, and an online key as CI holds it), publish a signed root and the template into a signed
# repository (its OCI image pushed to a local registry and signed), audit it, check it the way a node admin with
# only gpgv and sha256sum would, serve it on 127.0.0.1, fetch and verify it into a template cache with only the
# root key's fingerprint pinned, verify the image with stock skopeo and fetch it with tmplbuild's own client,
# read its SBOMs and provenance and ask which versions carry openssl,
# then rotate the online key (as after a stolen CI key) and watch the client follow the new root.
set -eu
PYTHON=${PYTHON:-python3}
OUT_GIVEN=${OUT+yes}
OUT=${OUT:-out/demo}
case $OUT in /*) ;; *) OUT=$PWD/$OUT ;; esac  # so that the rm -rf printed at the end works from anywhere
CACHE=${TMPLBUILD_CACHE_DIR:-/var/cache/tmplbuild}
# /tmp, not a possibly long $TMPDIR: gpg-agent's socket goes in $WORK/gnupg, and a Unix socket path has at most 107 bytes.
WORK=$(mktemp -d /tmp/tmplbuild-demo.XXXXXX)
SERVER_PID=
REGISTRY_PID=
tarball=
manifest=

# On success, failure and Ctrl-C alike: stop the server (master and workers: its own process group) and the
# throwaway key's gpg-agent, wait for them, and say what was left where.
cleanup() {
    status=$?
    set +e
    if [ -n "$SERVER_PID" ]; then
        kill -TERM -"$SERVER_PID" 2>/dev/null || kill -TERM "$SERVER_PID" 2>/dev/null
        wait "$SERVER_PID" 2>/dev/null
        kill -KILL -"$SERVER_PID" 2>/dev/null  # a worker that outlived its master
    fi
    if [ -n "$REGISTRY_PID" ]; then
        kill -TERM "$REGISTRY_PID" 2>/dev/null
        wait "$REGISTRY_PID" 2>/dev/null
    fi
    for home in "$WORK/gnupg" "$WORK/gnupg2" "$WORK/root-gnupg"; do
        [ -d "$home" ] && gpgconf --homedir "$home" --kill all 2>/dev/null
    done
    echo
    [ "$status" -eq 0 ] || echo "### the demo failed or was interrupted (exit $status)"
    echo "### what the demo left behind (no process of it is still running)"
    echo "  $WORK: throwaway keys, roots, repository, registry storage, server and registry logs, client config and"
    echo "    state, fetched template and image"
    if [ -z "$OUT_GIVEN" ]; then
        echo "  $OUT: the built template and its manifest"
        remove="'$OUT'"
    elif [ -n "$manifest" ]; then
        stem=${manifest%.manifest.json}
        echo "  $stem.tar.zst $stem.tar.xz $stem.oci.tar $stem.lxc-meta.tar.xz $stem.spdx.json $stem.cdx.json"
        echo "    $stem.intoto.json $manifest: the built template, its SBOMs and provenance, and its manifest"
        remove="'$stem.tar.zst' '$stem.tar.xz' '$stem.oci.tar' '$stem.lxc-meta.tar.xz' '$stem.spdx.json' '$stem.cdx.json'"
        remove="$remove '$stem.intoto.json' '$manifest'"
    else
        remove=
    fi
    echo "  $CACHE: the package cache, kept so that the next build downloads nothing"
    echo "remove them with:"
    echo "  rm -rf '$WORK' $remove"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP
tb() { "$PYTHON" -m tmplbuild "$@"; }

echo "### 1. build debian-12-minimal (package cache: $CACHE)"
tb build debian-12-minimal --out "$OUT" --cache-dir "$CACHE" --force
manifest=$(ls "$OUT"/debian-12-minimal_*_amd64.manifest.json | tail -n 1)
tarball=${manifest%.manifest.json}.tar.zst

echo
echo "### 2. throwaway keys, each in its own GNUPGHOME outside the project"
# A root key has a passphrase (asked on the terminal, or read from a file as here: a throwaway one).
(umask 077 && head -c 24 /dev/urandom | base64 > "$WORK/root-passphrase")
root_fpr=$(tb key generate --role root --passphrase-file "$WORK/root-passphrase" \
      --name "tmplbuild demo root <root@example.invalid>" --gnupghome "$WORK/root-gnupg" \
      --expire 1d --out "$WORK/keys/root.asc")
echo "root key   $root_fpr in $WORK/root-gnupg (offline, behind a passphrase: it signs roots, never an index;"
echo "           CI and the server never see it)"
fpr=$(tb key generate --name "tmplbuild demo CI <demo@example.invalid>" --gnupghome "$WORK/gnupg" --expire 1d \
      --out "$WORK/keys/demo.asc")
echo "online key $fpr in $WORK/gnupg (CI's: it signs the index and the templates)"
if gpg --homedir "$WORK/gnupg" --batch --list-secret-keys "$root_fpr" >/dev/null 2>&1; then
    echo "the root key's secret is in CI's GNUPGHOME"; exit 1
fi
echo "checked: CI's GNUPGHOME holds no secret root key"

echo
echo "### 3. an OCI registry on 127.0.0.1 (Debian's docker-registry, storage in $WORK/registry)"
port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
registry=127.0.0.1:$port
mkdir -p "$WORK/registry"
printf 'version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: %s\n' \
    "$WORK/registry/data" "$registry" > "$WORK/registry/config.yml"
docker-registry serve "$WORK/registry/config.yml" > "$WORK/registry.log" 2>&1 &
REGISTRY_PID=$!
for _ in $(seq 100); do
    "$PYTHON" -c "import urllib.request as u; u.urlopen('http://$registry/v2/', timeout=1)" 2>/dev/null && break
    sleep 0.1
done
echo "registry on http://$registry (plain HTTP on loopback: hence --oci-insecure-registry below)"

echo
echo "### 4. a signed repository with root 1, and the template published into it once it booted in containers"
echo "###    ($WORK/repo), its OCI image pushed to the registry and signed by the same key"
tb repo init "$WORK/repo" --key "$fpr" --gnupghome "$WORK/gnupg" --id tmplbuild-demo
mkdir -p "$WORK/roots"
tb root init "$WORK/roots/1.root.json" --repo-id tmplbuild-demo --root-key "$WORK/keys/root.asc" \
    --online-key "$WORK/keys/demo.asc"
tb root sign "$WORK/roots/1.root.json" --key "$root_fpr" --gnupghome "$WORK/root-gnupg" \
    --passphrase-file "$WORK/root-passphrase"
tb root publish "$WORK/roots/1.root.json" --repo "$WORK/repo"
tb publish "$manifest" --repo "$WORK/repo" --key "$fpr" --gnupghome "$WORK/gnupg" \
    --oci "$registry/tmplbuild" --oci-insecure-registry

echo
echo "### 5. audit: the root chain, then every file, hash and signature, with only the root fingerprint pinned"
tb repo verify "$WORK/repo" --root-key "$root_fpr"

echo
echo "### 6. what a node admin without tmplbuild can check: gpgv + sha256sum -c"
tb key export --key "$fpr" --gnupghome "$WORK/gnupg" --out-dir "$WORK/keys" >/dev/null
dir=$(dirname "$(ls "$WORK"/repo/templates/debian-12-minimal/*/*.tar.zst | tail -n 1)")
(cd "$dir" && gpgv --keyring "$WORK/keys/$fpr.gpg" SHA256SUMS.gpg SHA256SUMS && sha256sum -c SHA256SUMS)

echo
echo "### 7. serve the repository on 127.0.0.1 (gunicorn)"
# Not through tb: a shell function in the background is a subshell, and $! would be the subshell's pid, not
# the server's. setsid makes the server (gunicorn's master) the leader of its own process group, so cleanup
# stops master and workers together.
setsid "$PYTHON" -m tmplbuild serve "$WORK/repo" --host 127.0.0.1 --port 0 > "$WORK/serve.log" 2>&1 &
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
echo "### 8. a node admin pins the root key's fingerprint and fetches into a template cache ($WORK/cache)"
mkdir -p "$WORK/cache"
export TMPLBUILD_STATE_DIR="$WORK/state" TMPLBUILD_CONFIG_DIR="$WORK/config"
tb remote add demo "$url" --root-key "$root_fpr"
tb list --remote demo
tb fetch debian-12-minimal --remote demo --dest "$WORK/cache"
tb verify "$WORK/cache"/debian-12-minimal_*_amd64.tar.zst --remote demo

echo
echo "### 9. the same template from the OCI registry: verified by stock skopeo, and by tmplbuild's own client"
tb oci trust --remote demo --registry "$registry/tmplbuild" --out "$WORK/oci"
skopeo --policy "$WORK/oci/policy.json" --registries.d "$WORK/oci/registries.d" copy --quiet \
    --src-tls-verify=false --remove-signatures "docker://$registry/tmplbuild/debian-12-minimal:latest-amd64" \
    "oci-archive:$WORK/stock-skopeo.oci.tar"
echo "stock skopeo verified the signature ($WORK/oci/policy.json, signedBy the root's online key) and copied the image"
echo "the same image under a tag no signature names (as a registry could serve it):"
skopeo --policy "$WORK/oci/policy.json" --registries.d "$WORK/oci/registries.d" copy --quiet --remove-signatures \
    --src-tls-verify=false --dest-tls-verify=false "docker://$registry/tmplbuild/debian-12-minimal:latest-amd64" \
    "docker://$registry/tmplbuild/debian-12-minimal:renamed"
if skopeo --policy "$WORK/oci/policy.json" --registries.d "$WORK/oci/registries.d" copy --quiet \
    --src-tls-verify=false --remove-signatures "docker://$registry/tmplbuild/debian-12-minimal:renamed" \
    "oci-archive:$WORK/renamed.oci.tar" 2> "$WORK/renamed.err"; then
    echo "stock skopeo took an image under a tag nobody signed"; exit 1
fi
echo "refused by stock skopeo: $(tail -n 1 "$WORK/renamed.err" | sed 's/.*msg="//; s/"$//')"
tb fetch debian-12-minimal --remote demo --oci --oci-insecure-registry --dest "$WORK/cache"

echo
echo "### 10. what the template is made of: its SBOMs and provenance, checked like the template; which versions"
echo "###     carry openssl (exit 1: some do), and below a version that would fix it"
tb sbom debian-12-minimal --remote demo --format cyclonedx -o "$WORK/sbom.cdx.json" 2>&1
tb sbom debian-12-minimal --remote demo --format provenance -o "$WORK/provenance.intoto.json" 2>&1
tb show debian-12-minimal --remote demo | sed -n '1,/packages:/p'
set +e
tb affected openssl --remote demo 2>&1
status=$?
set -e
[ "$status" -eq 1 ] || { echo "expected exit 1 (the template carries openssl), got $status"; exit 1; }
tb affected openssl --fixed 1.0 --remote demo 2>&1

echo
echo "### 11. CI's key is replaced (as after a theft): root 2, signed with the root key, drops it"
fpr2=$(tb key generate --name "tmplbuild demo CI 2 <demo2@example.invalid>" --gnupghome "$WORK/gnupg2" \
       --expire 1d --out "$WORK/keys/demo2.asc")
tb root next "$WORK/repo/root/1.root.json" "$WORK/roots/2.root.json" --remove-online "$fpr" \
    --add-online "$WORK/keys/demo2.asc"
tb root sign "$WORK/roots/2.root.json" --key "$root_fpr" --gnupghome "$WORK/root-gnupg" \
    --passphrase-file "$WORK/root-passphrase"
tb root publish "$WORK/roots/2.root.json" --repo "$WORK/repo"
echo "the client follows root 2, and now refuses the index the old key signed:"
set +e
tb list --remote demo
status=$?
set -e
[ "$status" -eq 3 ] || { echo "expected exit 3, got $status"; exit 1; }
echo "(exit 3, as it must be)"
echo "the maintainer reviews the index and re-signs it with the new online key:"
tb repo resign "$WORK/repo" --carry-over --key "$fpr2" --gnupghome "$WORK/gnupg2"
tb list --remote demo
tb fetch debian-12-minimal --remote demo --dest "$WORK/cache"
tb remote list
echo
echo "done: $(ls "$WORK"/cache/*.tar.zst) and $(ls "$WORK"/cache/*.oci.tar) fetched and verified; repository in $WORK/repo"
