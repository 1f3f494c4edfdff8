"""The recipe as typed, frozen records. Parsing happens once, in `tmplbuild.recipe.load`; nothing downstream
sees raw strings for stages, formats or architectures."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path


class Stage(str, enum.Enum):
    """Named points in the build where recipe scripts run inside the chroot, in this order."""

    POST_BOOTSTRAP = "post-bootstrap"  # after debootstrap, before extra repositories and packages
    POST_INSTALL = "post-install"  # after packages and files are in place
    PRE_PACK = "pre-pack"  # after clean-up, the last thing before the tree is packed


class Compression(str, enum.Enum):
    """A recipe's `formats`: the root file system as tar.zst or tar.xz, and as an OCI image (an oci-archive holding
    one gzip layer with the same tar, tmplbuild.oci.image) for Proxmox VE 9.1, lxc-oci, skopeo and registries."""

    ZSTD = "tar.zst"
    XZ = "tar.xz"
    OCI = "oci"

    @property
    def file_format(self) -> str:
        """The file's suffix and its format in the index: <name>_<version>_<arch>.<file_format>."""
        return "oci.tar" if self is Compression.OCI else self.value

    @property
    def is_rootfs_tar(self) -> bool:
        return self is not Compression.OCI


# Debian architecture names debootstrap can target; validated at the edge so a typo fails before any work.
ARCHITECTURES = frozenset(
    {"amd64", "arm64", "armel", "armhf", "i386", "mips64el", "mipsel", "ppc64el", "riscv64", "s390x"}
)
VARIANTS = frozenset({"minbase", "buildd", "fakechroot", "-"})  # "-" is debootstrap's own default set


@dataclass(frozen=True)
class Script:
    stage: Stage
    name: str  # for logs and errors: the file name, or "<template>:inline-<n>" (n counts within its file)
    content: bytes  # the script text; a file-backed script is read at load time so the input hash covers it


@dataclass(frozen=True)
class AptRepository:
    """An extra apt repository, trusted only through its own key (deb822 Signed-By), never globally."""

    name: str
    uris: tuple[str, ...]
    suites: tuple[str, ...]
    components: tuple[str, ...]
    key: bytes  # the public key file's bytes (armored or binary), installed to /etc/apt/keyrings/<name>.<ext>
    key_armored: bool
    packages: tuple[str, ...]  # installed from this repository after it is added


@dataclass(frozen=True)
class FileEntry:
    """A file placed into the tree before the post-install stage."""

    dest: str  # absolute path inside the tree, normalised, no '..'
    content: bytes
    mode: int  # permission bits, e.g. 0o644


@dataclass(frozen=True)
class Bootstrap:
    variant: str  # minbase, buildd, ...
    components: tuple[str, ...]
    keyring: Path  # verifies the archive's Release file; always used
    mirror: str | None  # None: resolved at build time (flag, TMPLBUILD_MIRROR, host apt sources)
    # More suites merged into the bootstrap, newest version winning: `<suite>-updates` from the same mirror,
    # `<suite>-security` from the security mirror. They also go into the template's sources.list.
    extra_suites: tuple[str, ...] = ()
    security_mirror: str | None = None  # None: flag, TMPLBUILD_SECURITY_MIRROR, host apt sources


@dataclass(frozen=True)
class Sources:
    """What the template's own /etc/apt/sources.list names: its own setting, never the mirror the build
    downloaded from (a proxy, an apt cache or a file: mirror would give every container a broken apt)."""

    mirror: str | None = None  # None: the Debian mirror of the building host's apt sources
    security_mirror: str | None = None  # None: the security mirror of the building host's apt sources


@dataclass(frozen=True)
class Recipe:
    path: Path  # the file this recipe was loaded from
    name: str
    distribution: str
    release: str
    suite: str
    variant: str
    architectures: tuple[str, ...]
    description: str
    bootstrap: Bootstrap
    include: tuple[str, ...]  # packages from the main archive, passed to debootstrap --include
    exclude: tuple[str, ...]
    repositories: tuple[AptRepository, ...]
    scripts: tuple[Script, ...]  # in run order; parent recipe's first
    files: tuple[FileEntry, ...]
    formats: tuple[Compression, ...]  # at least one tarball (tar.zst or tar.xz); tar.zst by default
    version: str | None = None  # fixed version; None derives one from the release and the archive date
    sources: Sources = Sources()
    extends: tuple[str, ...] = ()  # chain of parent recipe names, nearest first (for the manifest)
    # Canonical bytes of everything the recipe contributes to the build (its own text, its parents', every
    # file and key it uses): the recipe half of the build input hash.
    canonical: bytes = field(default=b"", repr=False)

    def scripts_for(self, stage: Stage) -> tuple[Script, ...]:
        return tuple(s for s in self.scripts if s.stage is stage)
