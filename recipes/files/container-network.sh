#!/bin/sh
# Runs in the chroot at post-install: the container network set-up the recipe's files describe.
set -eu
# systemd-networkd + systemd-resolved configure what the container manager gives (LXC, systemd-nspawn);
# ifupdown (networking.service) what /etc/network/interfaces names (Proxmox).
systemctl enable systemd-networkd.service systemd-resolved.service tmplbuild-ifupdown-interfaces.service
# Nothing in a template waits for the network to be online; with no interface at all (a container started
# without a network) the wait would fail after two minutes and leave the boot degraded.
systemctl disable systemd-networkd-wait-online.service
# A container cannot mount the kernel's debug and config file systems (unprivileged LXC fails the units);
# Proxmox's own presets disable them too.
systemctl mask sys-kernel-debug.mount sys-kernel-config.mount
# The resolver: systemd-resolved's stub, fed by systemd-networkd's DHCP leases. Proxmox replaces this link
# with its own resolv.conf, and dhclient (ifupdown) writes its own on a dhcp stanza.
ln -sf ../run/systemd/resolve/stub-resolv.conf /etc/resolv.conf
