#!/bin/sh
# The main job, as far as it exists today: build debian-12-minimal from its shipped recipe, then check the
# template against its manifest the way a node admin would. Signing, publishing, serving and fetching join
# here as they land (see the README's roadmap).
set -eu
PYTHON=${PYTHON:-python3}
OUT=${OUT:-out/demo}
CACHE=${TMPLBUILD_CACHE_DIR:-/var/cache/tmplbuild}

echo "### 1. build debian-12-minimal (package cache: $CACHE)"
"$PYTHON" -m tmplbuild build debian-12-minimal --out "$OUT" --cache-dir "$CACHE" --force

manifest=$(ls "$OUT"/debian-12-minimal_*_amd64.manifest.json | tail -n 1)
echo
echo "### 2. check the template against its manifest ($manifest)"
"$PYTHON" - "$manifest" <<'PY'
import hashlib, json, sys
from pathlib import Path
m = json.loads(Path(sys.argv[1]).read_text())
for a in m["artifacts"]:
    path = Path(sys.argv[1]).with_name(a["file"])
    data = path.read_bytes()
    ok = len(data) == a["size"] and hashlib.sha256(data).hexdigest() == a["sha256"] \
        and hashlib.sha512(data).hexdigest() == a["sha512"]
    print(f"{a['file']}: {a['size'] / 1e6:.1f} MB, sha256 {a['sha256'][:16]}…: {'OK' if ok else 'MISMATCH'}")
    if not ok:
        sys.exit(3)
print(f"{m['name']} {m['version']} ({m['arch']}): {len(m['packages'])} packages, "
      f"archive state {m['build']['archive'][0]['inrelease_sha256'][:16]}…, input {m['build']['input_hash'][:23]}…")
PY
tarball=$(ls "$OUT"/debian-12-minimal_*_amd64.tar.zst | tail -n 1)
echo
echo "### 3. unpack check: $(tar --zstd -tf "$tarball" | wc -l) entries; /etc/debian_version is $(tar --zstd -xOf "$tarball" ./etc/debian_version)"
