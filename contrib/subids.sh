#!/bin/sh
# Give root the subordinate id range unprivileged LXC needs, as Proxmox VE configures it: root:100000:65536 in
# /etc/subuid and /etc/subgid. Idempotent. It never touches an existing line: when root already has a range, or
# another user's range overlaps 100000-165535, it says so and leaves the file as it is (then the lxc-unprivileged
# checks report why they cannot run). `make test`, `make demo` and .ci/run call it; SUBID_FILES overrides the
# files (tests).
set -eu
BASE=100000
COUNT=65536
files=${SUBID_FILES:-/etc/subuid /etc/subgid}
for f in $files; do
    [ -e "$f" ] || : > "$f"
    if grep -q "^root:" "$f"; then
        if ! grep -qx "root:$BASE:$COUNT" "$f"; then
            echo "subids: $f: root already has $(grep '^root:' "$f" | tr '\n' ' ')(not $BASE:$COUNT); left as it is" >&2
        fi
        continue
    fi
    overlap=$(awk -F: -v b="$BASE" -v c="$COUNT" 'NF == 3 && $2 < b + c && $2 + $3 > b { print $1 }' "$f" | head -n 1)
    if [ -n "$overlap" ]; then
        echo "subids: $f: $overlap's range overlaps $BASE-$((BASE + COUNT - 1)); root's not added" >&2
        continue
    fi
    echo "root:$BASE:$COUNT" >> "$f"
    echo "subids: added root:$BASE:$COUNT to $f (unprivileged containers, as Proxmox VE configures them)"
done
