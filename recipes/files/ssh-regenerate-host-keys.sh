#!/bin/sh
# Runs in the chroot at post-install. The builder deletes /etc/ssh/ssh_host_* before packing, because every
# container cloned from a template must have its own host keys; this unit makes them at first boot.
set -eu
cat > /etc/systemd/system/ssh-keygen-host-keys.service <<'UNIT'
[Unit]
Description=Generate SSH host keys on first boot
Before=ssh.service
ConditionPathExistsGlob=!/etc/ssh/ssh_host_*_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
UNIT
mkdir -p /etc/systemd/system/multi-user.target.wants
ln -sf /etc/systemd/system/ssh-keygen-host-keys.service \
    /etc/systemd/system/multi-user.target.wants/ssh-keygen-host-keys.service
