#!/bin/sh
# Let this host run arm64, armhf and riscv64 binaries for foreign-architecture builds and boot tests: binfmt_misc
# mounted, and the entries of Debian's qemu-user-static (registered with the fix-binary flag F) enabled.
# Idempotent; it changes nothing when both are already so. `make test` and .ci/run call it.
set -eu
dir=/proc/sys/fs/binfmt_misc
if [ ! -e "$dir/status" ]; then
    mount -t binfmt_misc binfmt_misc "$dir" || { echo "binfmt: cannot mount binfmt_misc at $dir" >&2; exit 1; }
fi
if command -v update-binfmts >/dev/null 2>&1; then
    for name in qemu-aarch64 qemu-arm qemu-riscv64; do
        [ -e "$dir/$name" ] || update-binfmts --enable "$name" >/dev/null 2>&1 || true
    done
fi
for name in qemu-aarch64 qemu-arm; do
    [ -e "$dir/$name" ] || echo "binfmt: $name is not registered (apt-get install qemu-user-static binfmt-support)" >&2
done
