"""Make the tree a template: remove what must be unique per container or must not ship, make what remains
reproducible, and refuse a tree that carries private key material."""
from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path

from tmplbuild.errors import UnsafeContentError

# Removed outright: unique per container (regenerated at first boot), build-host leftovers, variable caches.
REMOVE_GLOBS = (
    "etc/ssh/ssh_host_*",  # every container must get its own host keys
    "var/lib/systemd/random-seed",
    "var/lib/dbus/machine-id",
    "etc/*-",  # passwd-, shadow-, group-, gshadow-: backups that useradd leaves
    "var/lib/dpkg/*-old",
    "var/cache/debconf/*-old",
    "var/cache/ldconfig/aux-cache",
    "var/cache/apt/*.bin",
    "var/cache/apt/archives/*.deb",
    "var/cache/man/*",
    "root/.bash_history",
    "root/.wget-hsts",
    "root/.lesshst",
    "debootstrap",
    "usr/sbin/policy-rc.d",
)
# Emptied but kept (the directory, or a file other software expects to exist).
EMPTY_DIRS = ("var/lib/apt/lists", "tmp", "var/tmp", "run", "dev")
KEEP_IN_LISTS = {"partial", "lock"}
# /etc/hosts where a recipe brings none (debian-installer's): the container's own name resolves through
# nss-myhostname or systemd-resolved, or through the line Proxmox adds.
DEFAULT_HOSTS = ("127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\nff02::1\t\tip6-allnodes\n"
                 "ff02::2\t\tip6-allrouters\n")

# A marker alone is not a key: libraries (gnutls, openssl) carry these strings as literals. A key has a line of
# base64 within a few header lines after its BEGIN marker.
PEM_KEY = re.compile(
    rb"-----BEGIN (?:OPENSSH |RSA |DSA |EC |ENCRYPTED )?PRIVATE KEY-----\r?\n"
    rb"|-----BEGIN PGP PRIVATE KEY BLOCK-----\r?\n"
)
BASE64_LINE = re.compile(rb"^[A-Za-z0-9+/=]{40,}\r?$", re.M)
SCAN_LIMIT = 4 << 20  # key files are small; a larger file holding one is not a key file anyone relies on


def clean(root: Path, epoch: int) -> None:
    for pattern in REMOVE_GLOBS:
        for path in root.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    for name in EMPTY_DIRS:
        d = root / name
        if not d.is_dir():
            continue
        for entry in d.iterdir():
            if name == "var/lib/apt/lists" and entry.name in KEEP_IN_LISTS:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    # An empty machine-id makes systemd generate one at first boot (every container its own). Modes are set:
    # the host's may be odd.
    machine_id = root / "etc/machine-id"
    if machine_id.is_symlink():
        machine_id.unlink()
    machine_id.write_bytes(b"")
    machine_id.chmod(0o444)
    # resolv.conf: a link (systemd-resolved's stub, which a recipe sets up) stays; a file is what the build
    # host's resolver said while scripts ran, and is emptied. No /etc/hostname is written: the container keeps
    # the name its manager (LXC, systemd-nspawn, Proxmox) gives it.
    hostname = root / "etc/hostname"
    if hostname.is_file() and not hostname.is_symlink() and hostname.read_text(errors="replace").strip() \
            == socket.gethostname():
        hostname.unlink()  # the build host's name (debootstrap copies it), not anything a recipe chose
    resolv = root / "etc/resolv.conf"
    if not resolv.is_symlink():
        resolv.write_bytes(b"")
        resolv.chmod(0o644)
    _mark_updated(root, epoch)
    _clean_logs(root / "var/log")
    _clamp_shadow(root / "etc/shadow", epoch)


def _mark_updated(root: Path, epoch: int) -> None:
    """What systemd-update-done writes: /etc and /var are up to date with /usr as of the epoch (every packed
    mtime is clamped to it). Without it, every first boot re-ran sysusers, ldconfig and the catalog update
    (ConditionNeedsUpdate) for what the build already did, and sysusers occasionally failed there under load."""
    if not any((root / p).exists() for p in ("lib/systemd/systemd", "usr/lib/systemd/systemd")):
        return
    text = ("# This file was created by systemd-update-done. Its only\n# purpose is to hold a timestamp of the time "
            "this directory\n# was updated. See man:systemd-update-done.service(8).\n"
            f"TIMESTAMP_NSEC={epoch * 1_000_000_000}\n")
    for d in ("etc", "var"):
        if (root / d).is_dir():
            path = root / d / ".updated"
            path.write_text(text)
            path.chmod(0o644)


def _clean_logs(logdir: Path) -> None:
    """Logs say when and where the template was built: remove *.log and apt's logs, empty the rest (btmp,
    wtmp, lastlog keep their owners and modes, which login tools check)."""
    if not logdir.is_dir():
        return
    for path in sorted(logdir.rglob("*"), reverse=True):
        if path.is_symlink() or not path.is_file():
            continue
        if path.suffix in (".log", ".gz", ".xz") or path.name.endswith(".log.1"):
            path.unlink()
        else:
            path.write_bytes(b"")


def _clamp_shadow(shadow: Path, epoch: int) -> None:
    """Field 3 of /etc/shadow is the day of the last password change: the build date, unless clamped."""
    if not shadow.exists():
        return
    day = str(epoch // 86400)
    lines = []
    for line in shadow.read_text().splitlines():
        fields = line.split(":")
        if len(fields) > 2 and fields[2] and int(fields[2] or 0) > int(day):
            fields[2] = day
        lines.append(":".join(fields))
    st = shadow.stat()
    shadow.write_text("\n".join(lines) + "\n")
    os.chown(shadow, st.st_uid, st.st_gid)
    shadow.chmod(st.st_mode & 0o7777)


def find_private_keys(root: Path) -> list[str]:
    """Paths (relative to root) of files that hold private key material: PEM/OpenSSH private keys, armored
    or binary OpenPGP secret keys, GnuPG's private-keys-v1.d. Reads each regular file up to SCAN_LIMIT."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if not os.path.isfile(path) or os.path.islink(path) or st.st_size == 0 or st.st_size > SCAN_LIMIT:
                continue
            if "private-keys-v1.d" in rel.split(os.sep) or name == "secring.gpg":
                found.append(rel)
                continue
            with open(path, "rb") as f:
                data = f.read()
            if _has_pem_key(data) or _is_binary_secret_key(name, data):
                found.append(rel)
    return found


def _has_pem_key(data: bytes) -> bool:
    # ELF objects are skipped: gnutls and others compile known-answer self-test keys into their code, which
    # are public test vectors, not anyone's key.
    if data.startswith(b"\x7fELF") or b"PRIVATE KEY" not in data:
        return False
    return any(BASE64_LINE.search(data, m.end(), m.end() + 1024) for m in PEM_KEY.finditer(data))


def _is_binary_secret_key(name: str, data: bytes) -> bool:
    # An OpenPGP Secret-Key packet (tag 5): old format 0x94-0x97, new format 0xC5; then key version 4, 5 or 6.
    if not name.endswith((".gpg", ".pgp", ".key", ".sec", ".kbx")) or len(data) < 8:
        return False
    first = data[0]
    if 0x94 <= first <= 0x97:
        header = 1 + (1, 2, 4, 0)[first & 3]
    elif first == 0xC5:
        header = 2 if data[1] < 192 else (3 if data[1] < 224 else 6)
    else:
        return False
    return header < len(data) and data[header] in (4, 5, 6)


def refuse_private_keys(root: Path) -> None:
    """Raises UnsafeContentError (exit 6) when the tree holds private key material."""
    found = find_private_keys(root)
    if found:
        shown = ", ".join("/" + p for p in found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise UnsafeContentError("private key scan", f"refusing to pack: private key material in {shown}")
