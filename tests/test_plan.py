"""The bootstrap plan and the debootstrap argv: pure functions, no root, no network."""
from __future__ import annotations

from pathlib import Path

import pytest

from tmplbuild.builder.archive import Package, parse_packages, select_stanzas
from tmplbuild.builder.plan import WRAPPER, debootstrap_argv, lists_name, make_plan, missing_packages

INDEX = b"""Package: libc6
Version: 2.36-9
Architecture: amd64
Priority: required
Filename: pool/main/g/glibc/libc6_2.36-9_amd64.deb
Size: 100
SHA256: aa
Depends: libgcc-s1

Package: libgcc-s1
Version: 12.2.0-14
Architecture: amd64
Priority: optional
Filename: pool/main/g/gcc-12/libgcc-s1_12.2.0-14_amd64.deb
Size: 10
SHA256: bb
Depends: gcc-12-base (= 12.2.0-14), libc6 (>= 2.35)

Package: gcc-12-base
Version: 12.2.0-14
Architecture: amd64
Priority: required
Filename: pool/main/g/gcc-12/gcc-12-base_12.2.0-14_amd64.deb
Size: 10
SHA256: cc

Package: apt
Version: 1:2.6.1
Architecture: amd64
Priority: important
Filename: pool/main/a/apt/apt_2.6.1_amd64.deb
Size: 10
SHA256: dd
Pre-Depends: libc6
Depends: adduser | passwd, debian-archive-keyring, virtual-thing, usrmerge

Package: adduser
Version: 3.134
Architecture: all
Priority: important
Filename: pool/main/a/adduser/adduser_3.134_all.deb
Size: 10
SHA256: ee

Package: passwd
Version: 1:4.13
Architecture: amd64
Priority: required
Filename: pool/main/s/shadow/passwd_4.13_amd64.deb
Size: 10
SHA256: ff

Package: debian-archive-keyring
Version: 2023.3
Architecture: all
Priority: important
Filename: pool/main/d/debian-archive-keyring/debian-archive-keyring_2023.3_all.deb
Size: 10
SHA256: 11

Package: usrmerge
Version: 37
Architecture: all
Priority: optional
Filename: pool/main/u/usrmerge/usrmerge_37_all.deb
Size: 10
SHA256: 22

Package: usr-is-merged
Version: 37
Architecture: all
Priority: optional
Filename: pool/main/u/usrmerge/usr-is-merged_37_all.deb
Size: 10
SHA256: 33

Package: openssh-server
Version: 1:9.2p1-2
Architecture: amd64
Priority: optional
Filename: pool/main/o/openssh/openssh-server_9.2p1-2_amd64.deb
Size: 10
SHA256: 44
Depends: libc6:any (>= 2.36), adduser
"""


@pytest.fixture
def packages() -> dict[str, Package]:
    return parse_packages(INDEX)


def plan(packages, **kw):
    args = dict(codename="bookworm", variant="minbase", include=(), exclude=(), https_mirror=False)
    args.update(kw)
    return make_plan(packages, **args)


def test_parse_takes_first_alternative_and_strips_versions_and_arch_qualifiers(packages):
    assert packages["apt"].depends == ("libc6", "adduser", "debian-archive-keyring", "virtual-thing", "usrmerge")
    assert packages["openssh-server"].depends == ("libc6", "adduser")
    assert packages["apt"].deb_name == "apt_1%3a2.6.1_amd64.deb"  # epoch colon escaped as debootstrap does


def test_minbase_plan_is_required_closure_plus_apt_closure(packages):
    p = plan(packages)
    # required: Priority required, their dependencies, and usr-is-merged on bookworm
    assert p.required == ("gcc-12-base", "libc6", "libgcc-s1", "passwd", "usr-is-merged")
    # base: apt's closure minus what is required; virtual names dropped; usrmerge never pulled in
    assert p.base == ("adduser", "apt", "debian-archive-keyring")
    assert missing_packages(p) == []


def test_include_and_exclude(packages):
    p = plan(packages, include=("openssh-server",), exclude=("passwd",))
    assert "openssh-server" in p.base and "passwd" not in p.required + p.base


def test_unknown_include_is_reported_missing(packages):
    assert missing_packages(plan(packages, include=("no-such-package",))) == ["no-such-package"]


def test_trixie_has_no_usr_is_merged_but_still_excludes_usrmerge(packages):
    p = plan(packages, codename="trixie")
    assert "usr-is-merged" not in p.required and "usrmerge" not in p.base


def test_https_mirror_adds_ca_certificates_like_debootstrap(packages):
    assert missing_packages(plan(packages, https_mirror=True)) == ["ca-certificates"]


def test_debs_follow_index_order_and_debpaths_format(packages):
    p = plan(packages)
    assert [d.name for d in p.debs] == ["libc6", "libgcc-s1", "gcc-12-base", "apt", "adduser", "passwd",
                                        "debian-archive-keyring", "usr-is-merged"]
    assert p.debpaths().splitlines()[3] == "apt /var/cache/apt/archives/apt_1%3a2.6.1_amd64.deb"


def test_select_stanzas_keeps_only_named_packages_in_order(packages):
    trimmed = select_stanzas(INDEX, {"apt", "libc6"})
    assert list(parse_packages(trimmed)) == ["libc6", "apt"]
    assert parse_packages(trimmed)["apt"] == packages["apt"]


def test_debootstrap_argv_is_a_list_with_the_plan_and_no_shell():
    argv = debootstrap_argv(suite="bookworm", target=Path("/b/root"), mirror="http://mirror.example.invalid/debian",
                            arch="amd64", variant="minbase", components=("main", "contrib"),
                            plan_tarball=Path("/b/plan.tar"))
    assert argv == [str(WRAPPER), "--arch=amd64", "--components=main,contrib", "--unpack-tarball=/b/plan.tar",
                    "--variant=minbase", "bookworm", "/b/root", "http://mirror.example.invalid/debian"]


def test_debootstrap_default_variant_has_no_variant_flag():
    argv = debootstrap_argv(suite="trixie", target=Path("/r"), mirror="file:///srv/m", arch="arm64", variant="-",
                            components=("main",), plan_tarball=Path("/p.tar"))
    assert not any(a.startswith("--variant") for a in argv)


def test_lists_name_matches_apt_dest():
    assert lists_name("http://mirror.example.invalid/debian", "dists/bookworm/main/binary-amd64/Packages") == \
        "mirror.example.invalid_debian_dists_bookworm_main_binary-amd64_Packages"
    assert lists_name("file:///srv/mirror", "dists/trixie/InRelease") == "_srv_mirror_dists_trixie_InRelease"


@pytest.mark.parametrize("a, b", [
    ("1.0", "1.0"), ("1.0", "1.1"), ("1:1.0", "2.0"), ("1.0~rc1", "1.0"), ("1.0-1", "1.0-2"),
    ("2.36-9+deb12u10", "2.36-9+deb12u9"), ("1.0a", "1.0"), ("1.0~", "1.0~~"), ("1.0.0", "1.0"), ("0:1", "1"),
    ("3.0.22-1~deb12u2", "3.0.17-1~deb12u1"), ("20250419~deb12u2", "20230311"), ("1.2+b1", "1.2"),
])
def test_version_compare_agrees_with_dpkg(a, b):
    import subprocess

    from tmplbuild.builder.archive import version_compare

    def dpkg(op: str) -> bool:
        return subprocess.run(["dpkg", "--compare-versions", a, op, b]).returncode == 0

    expected = -1 if dpkg("lt") else (1 if dpkg("gt") else 0)
    assert version_compare(a, b) == expected


def test_merge_newest_takes_the_higher_version_and_keeps_the_position(packages):
    from dataclasses import replace

    from tmplbuild.builder.archive import merge_newest

    security = {"libc6": replace(packages["libc6"], version="2.36-9+deb12u1", origin="bookworm-security/main"),
                "apt": replace(packages["apt"], version="1:2.6.0", origin="bookworm-security/main")}
    merged = merge_newest([packages, security])
    assert list(merged) == list(packages)
    assert merged["libc6"].origin == "bookworm-security/main"
    assert merged["apt"].version == "1:2.6.1"  # older in the extra suite: the main suite's stays
