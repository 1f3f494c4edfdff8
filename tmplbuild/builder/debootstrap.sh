#!/bin/sh
# The one way tmplbuild runs debootstrap: a clean environment, a umask that gives the tree standard
# permissions, and a refusal to run without a keyring unless the caller hands debootstrap a plan it already
# verified (--unpack-tarball). Arguments are passed through unchanged as argv; nothing is re-parsed by a shell.
set -eu
umask 022
export LC_ALL=C.UTF-8 PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset DEBOOTSTRAP_DIR TMPDIR http_proxy https_proxy 2>/dev/null || true

verified=no
for arg in "$@"; do
    case "$arg" in
        --keyring=*|--unpack-tarball=*) verified=yes ;;
        --no-check-gpg|--no-check-certificate|--allow-unauthenticated) echo "debootstrap.sh: refusing $arg" >&2; exit 2 ;;
    esac
done
if [ "$verified" != yes ]; then
    echo "debootstrap.sh: refusing to run without --keyring (archive verification is not optional)" >&2
    exit 2
fi
command -v debootstrap >/dev/null 2>&1 || { echo "debootstrap.sh: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 2; }
exec debootstrap "$@"
