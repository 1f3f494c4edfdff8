#!/bin/sh
# netns-exec.sh NETNS CMD [ARG...]: run CMD inside the network namespace /run/netns/NETNS, in a private mount
# namespace whose /sys shows that namespace's devices (LXC looks for its bridge under /sys/class/net) while
# /sys/fs/cgroup stays the host's (systemd-nspawn and LXC both need it). `ip netns exec` remounts /sys too but
# drops the cgroup mounts with it, after which systemd-nspawn fails with "Failed to determine whether the
# unified cgroups hierarchy is used". Arguments are passed through as argv; nothing is re-parsed by a shell.
set -eu
[ $# -ge 2 ] || { echo "usage: netns-exec.sh NETNS CMD [ARG...]" >&2; exit 2; }
ns=$1
shift
case "$ns" in
    ""|*/*|.*) echo "netns-exec.sh: bad namespace name: $ns" >&2; exit 2 ;;
esac
[ -e "/run/netns/$ns" ] || { echo "netns-exec.sh: no network namespace $ns" >&2; exit 2; }
exec nsenter --net="/run/netns/$ns" unshare --mount --propagation private sh -euc '
cg=$(mktemp -d /run/tmplbuild-cgroup.XXXXXX)
mount --rbind /sys/fs/cgroup "$cg"
mount -t sysfs sysfs /sys
mount --move "$cg" /sys/fs/cgroup
rmdir "$cg"
exec "$@"' netns-exec "$@"
