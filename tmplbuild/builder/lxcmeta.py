"""The LXC metadata tarball that `lxc-create -t local -- --metadata META --fstree ROOTFS.tar.xz` reads (and
lxc-download's images carry): `config` and `config-user` (the distribution's common LXC settings and the
architecture), `excludes-user` and `create-message`. Deterministic: same inputs, same bytes."""
from __future__ import annotations

import io
import lzma
import tarfile

from tmplbuild.repo.index import LXC_META_FORMAT as FORMAT
# Debian architecture → the kernel personality name lxc.arch takes.
LXC_ARCH = {"amd64": "x86_64", "arm64": "aarch64", "armel": "armel", "armhf": "armhf", "i386": "i686",
            "mips64el": "mips64", "mipsel": "mips", "ppc64el": "ppc64le", "riscv64": "riscv64", "s390x": "s390x"}


def files(name: str, version: str, arch: str, distribution: str, description: str) -> dict[str, str]:
    common = f"lxc.include = LXC_TEMPLATE_CONFIG/{distribution}.common.conf\n"
    lxc_arch = f"lxc.arch = {LXC_ARCH[arch]}\n"
    return {
        "config": f"{common}{lxc_arch}",
        "config-user": f"{common}lxc.include = LXC_TEMPLATE_CONFIG/{distribution}.userns.conf\n{lxc_arch}",
        # An unprivileged container cannot create device nodes; LXC provides /dev itself.
        "excludes-user": "./dev/*\n",
        "create-message": (f"You just created a container from {name} {version} ({arch}): {description}.\n"
                           "It takes its host name from LXC and its network by DHCP on eth0 "
                           "(systemd-networkd, systemd-resolved).\n"),
    }


def meta_tarball(name: str, version: str, arch: str, distribution: str, description: str, epoch: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for fname, text in sorted(files(name, version, arch, distribution, description).items()):
            data = text.encode()
            info = tarfile.TarInfo(fname)
            info.size, info.mode, info.mtime = len(data), 0o644, epoch
            tar.addfile(info, io.BytesIO(data))
    return lzma.compress(buf.getvalue(), format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64)
