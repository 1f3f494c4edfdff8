"""tmplbuild.sbom.copyright: a DEP-5 copyright file as one SPDX license expression, NOASSERTION whenever the
answer would be a guess; the copyright file of a package read inside a built tree only, whatever its symlinks
say; and the real copyright files of this host."""
from __future__ import annotations

import os
import re
import functools
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tmplbuild.sbom import copyright as cr
from tmplbuild.sbom.copyright import NOASSERTION, expression, package_license

FORMAT = "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"
LICENSE_REF = re.compile(r"LicenseRef-[A-Za-z0-9.-]+")


def dep5(*licenses: str, header: str | None = None) -> str:
    """A machine-readable copyright file with one Files paragraph per licence line (and a header License)."""
    text = FORMAT + "Upstream-Name: demo\n" + (f"License: {header}\n" if header is not None else "")
    for i, line in enumerate(licenses):
        text += f"\nFiles: part{i}/*\nCopyright: 2020 Someone <someone@example.org>\nLicense: {line}\n"
    return text


def one(line: str) -> str:
    return expression(dep5(line))


@functools.cache
def licensing():
    """SPDX's licence and exception lists as license_expression knows them (test-only: it comes with spdx-tools;
    the module under test must not import it)."""
    import license_expression  # a test dependency (pyproject: spdx-tools)

    return license_expression.get_spdx_licensing()


def assert_valid_spdx(expr: str) -> None:
    """`expr` parses as an SPDX expression whose ids are all SPDX-listed, except LicenseRef-s (which
    license_expression reports as unknown keys: that error and nothing else is allowed)."""
    info = licensing().validate(expr, strict=True)
    assert all(error.startswith("Unknown license key(s)") for error in info.errors), (expr, info.errors)
    assert all(LICENSE_REF.fullmatch(symbol) for symbol in info.invalid_symbols), (expr, info.invalid_symbols)


# -- names ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("debian, spdx", [
    ("GPL-1", "GPL-1.0-only"), ("GPL-1+", "GPL-1.0-or-later"),
    ("GPL-2", "GPL-2.0-only"), ("GPL-2+", "GPL-2.0-or-later"),
    ("GPL-3", "GPL-3.0-only"), ("GPL-3+", "GPL-3.0-or-later"),
    ("LGPL-2", "LGPL-2.0-only"), ("LGPL-2+", "LGPL-2.0-or-later"),
    ("LGPL-2.1", "LGPL-2.1-only"), ("LGPL-2.1+", "LGPL-2.1-or-later"),
    ("LGPL-3", "LGPL-3.0-only"), ("LGPL-3+", "LGPL-3.0-or-later"),
    ("AGPL-3", "AGPL-3.0-only"), ("AGPL-3+", "AGPL-3.0-or-later"),
    ("GFDL-1.1", "GFDL-1.1-only"), ("GFDL-1.2+", "GFDL-1.2-or-later"), ("GFDL-1.3", "GFDL-1.3-only"),
    ("GPL-2.0+", "GPL-2.0-or-later"), ("LGPL-2.1-or-later", "LGPL-2.1-or-later"), ("GPL-3.0", "GPL-3.0-only"),
    ("Apache-1.0", "Apache-1.0"), ("Apache-1.1", "Apache-1.1"), ("Apache-2.0", "Apache-2.0"),
    ("Artistic-2.0", "Artistic-2.0"),
    ("BSD-2-clause", "BSD-2-Clause"), ("BSD-3-clause", "BSD-3-Clause"), ("BSD-4-clause", "BSD-4-Clause"),
    ("Expat", "MIT"), ("expat", "MIT"), ("MIT", "MIT"), ("ISC", "ISC"), ("Zlib", "Zlib"), ("ZLIB", "Zlib"),
    ("MPL-1.1", "MPL-1.1"), ("MPL-2.0", "MPL-2.0"), ("CC0-1.0", "CC0-1.0"), ("CC-BY-SA-4.0", "CC-BY-SA-4.0"),
    ("Python-2.0", "Python-2.0"), ("PSF-2.0", "PSF-2.0"), ("OpenSSL", "OpenSSL"), ("X11", "X11"),
    ("BSL-1.0", "BSL-1.0"), ("EPL-2.0", "EPL-2.0"), ("CDDL-1.0", "CDDL-1.0"), ("Unlicense", "Unlicense"),
    ("WTFPL", "WTFPL"), ("PostgreSQL", "PostgreSQL"), ("Sleepycat", "Sleepycat"), ("OFL-1.1", "OFL-1.1"),
    ("FTL", "FTL"), ("libpng", "Libpng"), ("Zope-2.1", "ZPL-2.1"), ("W3C", "W3C"), ("curl", "curl"),
    ("Beerware", "Beerware"), ("bzip2-1.0.6", "bzip2-1.0.6"),
])
def test_known_names_map_to_spdx_ids(debian, spdx):
    assert one(debian) == spdx
    assert one(debian.lower()) == spdx and one(debian.upper()) == spdx  # the lookup ignores case


@pytest.mark.parametrize("debian, ref", [
    ("GPL", "LicenseRef-GPL"), ("LGPL", "LicenseRef-LGPL"), ("BSD", "LicenseRef-BSD"),
    ("Artistic", "LicenseRef-Artistic"), ("public-domain", "LicenseRef-public-domain"),
    ("permissive", "LicenseRef-permissive"), ("other", "LicenseRef-other"),
    ("SSLeay", "LicenseRef-SSLeay"),  # SSLeay-standalone is not what Debian means
    ("GFDL-NIV-1.3+", "LicenseRef-GFDL-NIV-1.3-"), ("GFDL-NIV-1.2", "LicenseRef-GFDL-NIV-1.2"),
    ("CC0", "LicenseRef-CC0"),  # no version: no guess
    ("MPL-1.1+", "LicenseRef-MPL-1.1-"),  # "+" only maps where SPDX has an -or-later id
    ("Artistic+", "LicenseRef-Artistic-"),
    ("GPL-3/OpenSSL", "LicenseRef-GPL-3-OpenSSL"), ("LGPL-2.1+~OpenSSL", "LicenseRef-LGPL-2.1--OpenSSL"),
    ("BSD3_Google", "LicenseRef-BSD3-Google"), ("LicenseRef-x", "LicenseRef-LicenseRef-x"),
])
def test_unknown_names_become_license_refs(debian, ref):
    assert one(debian) == ref
    assert_valid_spdx(ref)


# -- operators --------------------------------------------------------------------------------------------------

def test_or_and_and_with_and_binding_tighter():
    assert one("GPL-2+ or Artistic") == "GPL-2.0-or-later OR LicenseRef-Artistic"
    assert one("GPL-2+ and BSD-3-clause") == "BSD-3-Clause AND GPL-2.0-or-later"
    assert one("GPL-2+ or MIT and ISC") == "GPL-2.0-or-later OR (ISC AND MIT)"
    assert one("GPL-2+ and MIT or ISC") == "(GPL-2.0-or-later AND MIT) OR ISC"
    assert one("gpl-2+ OR expat And isc") == "GPL-2.0-or-later OR (ISC AND MIT)"  # operators ignore case


def test_a_comma_before_an_operator_lowers_its_precedence():
    assert one("GPL-2+ or Artistic, and BSD-3-clause") == \
        "(GPL-2.0-or-later OR LicenseRef-Artistic) AND BSD-3-Clause"
    assert one("GPL-2+ or Artistic , and BSD-3-clause") == one("GPL-2+ or Artistic, and BSD-3-clause")
    assert one("MIT, or GPL-2+ and ISC") == "(GPL-2.0-or-later AND ISC) OR MIT"
    assert one("GPL-1+ or Artistic, and Expat and ISC") == \
        "(GPL-1.0-or-later OR LicenseRef-Artistic) AND ISC AND MIT"
    assert one("GPL-1+ or Artistic, and Expat, and ISC") == one("GPL-1+ or Artistic, and Expat and ISC")
    # a paragraph that is an AND of an OR and others, among other paragraphs: its OR keeps its parentheses
    assert expression(dep5("GPL-2+ or Artistic, and BSD-3-clause", "Zlib")) == \
        "(GPL-2.0-or-later OR LicenseRef-Artistic) AND BSD-3-Clause AND Zlib"


def test_parentheses_group_when_balanced():
    assert one("(GPL-2+ or MIT) and ISC") == "(GPL-2.0-or-later OR MIT) AND ISC"
    assert one("ISC and (MIT or GPL-2+)") == "(GPL-2.0-or-later OR MIT) AND ISC"


# -- exceptions -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("line, spdx", [
    ("GPL-2+ with OpenSSL exception", "LicenseRef-GPL-2--with-OpenSSL-exception"),
    ("GPL-2+ with Autoconf exception", "LicenseRef-GPL-2--with-Autoconf-exception"),  # which version? no guess
    ("GPL-3+ with Bison exception", "LicenseRef-GPL-3--with-Bison-exception"),
    ("GPL-3+ with GCC-Runtime-3.1 exception", "LicenseRef-GPL-3--with-GCC-Runtime-3.1-exception"),
    ("GPL with Libtool exception", "LicenseRef-GPL-with-Libtool-exception"),  # the licence is unknown
    ("Expat with embedded exception", "LicenseRef-Expat-with-embedded-exception"),
    ("Apache-2.0 with LLVM exception", "Apache-2.0 WITH LLVM-exception"),
    ("Apache-2.0 WITH llvm-exception", "Apache-2.0 WITH LLVM-exception"),
    ("GPL-2+ with Libtool exception", "GPL-2.0-or-later WITH Libtool-exception"),
    ("GPL-2 with Linux-syscall-note exception", "GPL-2.0-only WITH Linux-syscall-note"),
    ("GPL-3+ with GCC-exception-3.1 exception", "GPL-3.0-or-later WITH GCC-exception-3.1"),
    ("GPL-2+ with Classpath-exception-2.0", "GPL-2.0-or-later WITH Classpath-exception-2.0"),
    ("GPL-3+ with Autoconf-exception-3.0 exception", "GPL-3.0-or-later WITH Autoconf-exception-3.0"),
    ("GPL-2+ with Font-exception-2.0 exception", "GPL-2.0-or-later WITH Font-exception-2.0"),
    ("GPL-2+ with Bison-exception-2.2 exception", "GPL-2.0-or-later WITH Bison-exception-2.2"),
])
def test_exceptions_map_only_when_literally_an_spdx_exception_id(line, spdx):
    assert one(line) == spdx
    assert_valid_spdx(spdx)


def test_an_exception_term_inside_operators():
    assert one("GPL-2+ with OpenSSL exception or MIT") == "LicenseRef-GPL-2--with-OpenSSL-exception OR MIT"
    assert one("GPL-2+ with Libtool exception and GPL-3+ with Libtool exception and GPL-3+") == \
        "GPL-2.0-or-later WITH Libtool-exception AND GPL-3.0-or-later AND GPL-3.0-or-later WITH Libtool-exception"
    assert one("FSF-unlimited and GPL-2+ with Libtool exception") == \
        "GPL-2.0-or-later WITH Libtool-exception AND LicenseRef-FSF-unlimited"


# -- what does not parse: NOASSERTION, never a partial answer -----------------------------------------------------

@pytest.mark.parametrize("line", [
    "", "   ", "or", "and MIT", "MIT or", "MIT and", "MIT or or ISC", "MIT ISC", "MIT, ISC", "MIT,", ", and MIT",
    "BSD-3-clause and/or GPL-3+", "MIT/X Consortium License", "Permission is hereby granted, free of charge",
    "(MIT or ISC", "MIT or ISC)", "()", "MIT (see COPYING)", "MIT or ISC, and Zlib, or BSD-2-clause",
    "GPL-2+ with", "GPL-2+ with exception", "with OpenSSL exception", "GPL-2 with OpenSSL and Qt exceptions",
    "+", "GPL-2+ with OpenSSL exception with more exception",
])
def test_an_unparseable_license_line_makes_the_whole_file_noassertion(line):
    assert one(line) == NOASSERTION
    assert expression(dep5("MIT", line, "ISC")) == NOASSERTION
    assert expression(dep5("MIT", header=line)) == NOASSERTION if line.strip() else "MIT"


def test_a_files_paragraph_without_license_is_noassertion():
    text = dep5("MIT") + "\nFiles: other/*\nCopyright: 2020 Someone\n"
    assert expression(text) == NOASSERTION


# -- paragraphs -------------------------------------------------------------------------------------------------

def test_header_license_and_several_files_paragraphs():
    assert expression(dep5("GPL-2+", "Expat", "BSD-3-clause", header="GPL-2+ or LGPL-3+")) == \
        "(GPL-2.0-or-later OR LGPL-3.0-or-later) AND BSD-3-Clause AND GPL-2.0-or-later AND MIT"
    assert expression(dep5("Expat", header="MIT")) == "MIT"
    # an empty first line in the optional header License introduces a summary, not a licence
    text = FORMAT + "License:\n Different licences apply to different files.\n\nFiles: *\nCopyright: x\nLicense: ISC\n"
    assert expression(text) == "ISC"


def test_only_the_header_licence_is_not_enough():
    assert expression(dep5(header="MIT")) == NOASSERTION
    assert expression(FORMAT + "License: MIT\n\nLicense: MIT\n Permission is hereby granted...\n") == NOASSERTION


def test_stand_alone_license_paragraphs_and_license_texts_are_ignored():
    text = dep5("GPL-2+", "Expat") + (
        "\nLicense: GPL-2+\n This program is free software; ...\n .\n License: Artistic\n"
        "\nLicense: Expat\n Permission is hereby granted, free of charge ...\n"
        "\nLicense: BSD-4-clause\n An unused licence text is not a licence of any file.\n")
    assert expression(text) == "GPL-2.0-or-later AND MIT"


def test_single_expressions_are_not_wrapped_and_duplicates_collapse():
    assert expression(dep5("GPL-2+ or Artistic", "Artistic or GPL-2+", "gpl-2+ OR Artistic")) == \
        "GPL-2.0-or-later OR LicenseRef-Artistic"
    # a LicenseRef keeps the Debian spelling (the builder names the licence texts after it): case matters there
    assert expression(dep5("Artistic", "artistic")) == "LicenseRef-Artistic AND LicenseRef-artistic"
    assert expression(dep5("Expat", "MIT", "expat", "MIT and Expat", "MIT or Expat")) == "MIT"
    assert expression(dep5("GPL-2+", "GPL-2+ and ISC", "ISC", header="ISC")) == "GPL-2.0-or-later AND ISC"


def test_deterministic_whatever_the_order_of_the_paragraphs():
    lines = ["GPL-2+ or Artistic", "Expat", "public-domain", "BSD-3-clause and ISC", "LGPL-2.1+ or MPL-2.0"]
    first = expression(dep5(*lines))
    assert first == ("(GPL-2.0-or-later OR LicenseRef-Artistic) AND (LGPL-2.1-or-later OR MPL-2.0) AND "
                     "BSD-3-Clause AND ISC AND LicenseRef-public-domain AND MIT")
    assert expression(dep5(*reversed(lines))) == first
    assert expression(dep5(*lines[2:], *lines[:2])) == first
    assert all(expression(dep5(*lines)) == first for _ in range(3))
    assert_valid_spdx(first)


def test_deb822_details():
    # field names ignore case, values are trimmed, continuation lines are not fields, CRLF, a BOM, comments,
    # whitespace-only lines separate paragraphs
    text = ("\ufefffOrMaT:   https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/  \r\n"
            "Upstream-Name: demo\r\n"
            "Comment: a comment\r\n that goes on\r\n License: BSD-4-clause\r\n"
            "  \t \r\n"
            "# a comment line\r\n"
            "FILES: *\r\ncopyright: 2020 x\r\nLICENSE:   ISC   \r\n Permission to use ...\r\n")
    assert expression(text) == "ISC"


@pytest.mark.parametrize("text", [
    FORMAT + "\n Files: *\nLicense: MIT\n",  # a continuation line outside any paragraph
    FORMAT + "\nFiles: *\nLicense: MIT\nLicense: ISC\n",  # a field twice: which one?
    FORMAT + "\nFiles: *\nCopyright: x\nLicense: MIT\nThis line is not a field\n",
    FORMAT + "Files: *\nLicense: MIT\n",  # the header is also a Files paragraph
])
def test_a_broken_deb822_structure_is_noassertion(text):
    assert expression(text) == NOASSERTION


@pytest.mark.parametrize("format_line", [
    "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/",
    "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0",
    "Format: http://www.debian.org/doc/packaging-manuals/copyright-format/1.0/",
    "Format: http://dep.debian.net/deps/dep5",
    "Format: http://dep.debian.net/deps/dep5/",
    "Format: http://svn.debian.org/wsvn/dep/web/deps/dep5.mdwn?op=file&rev=174",
    "Format: http://svn.debian.org/wsvn/dep/web/deps/dep5.mdwn?rev=174",
    "Format: http://anonscm.debian.org/viewvc/dep/web/deps/dep5.mdwn?view=markup&pathrev=174",
])
def test_machine_readable_format_urls(format_line):
    assert expression(f"{format_line}\n\nFiles: *\nCopyright: x\nLicense: Expat\n") == "MIT"


@pytest.mark.parametrize("text", [
    "Files: *\nCopyright: x\nLicense: MIT\n",  # no header
    "Upstream-Name: x\n\nFiles: *\nCopyright: x\nLicense: MIT\n",
    "Format: https://example.org/copyright-format/1.0/\n\nFiles: *\nCopyright: x\nLicense: MIT\n",
    "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/2.0/\n\nFiles: *\nLicense: MIT\n",
    "Format: \n\nFiles: *\nCopyright: x\nLicense: MIT\n",
    "Upstream-Name: x\n\n" + FORMAT + "\nFiles: *\nCopyright: x\nLicense: MIT\n",  # Format not in the first
    "This package was debianized by Someone <someone@debian.org> on\nMon, 1 Jan 2001.\n\nLicense: GPL-2+\n",
    "Copyright: 2001 Someone\nLicense: MIT\n",
])
def test_not_machine_readable_is_noassertion(text):
    assert expression(text) == NOASSERTION


@pytest.mark.parametrize("text", [
    "", "\n\n\n", " ", "\x00\x01\x02", FORMAT + "\nFiles: *\nLicense: MIT\x00\n", "\ufffd" * 100,
    bytes(range(256)).decode("latin-1"), FORMAT + "\n" + "(" * 5000 + "MIT" + ")" * 5000,
    dep5("(" * 5000 + "MIT" + ")" * 5000), dep5("MIT") + " " * (cr.MAX_BYTES + 1),
    None, b"Format: x", 42, ["MIT"],
])
def test_garbage_is_noassertion_and_never_raises(text):
    assert expression(text) == NOASSERTION  # type: ignore[arg-type]


def test_the_module_does_not_import_the_heavy_spdx_libraries():
    code = ("import sys, tmplbuild.sbom.copyright; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('license_expression', 'spdx_tools')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -- the tables cannot drift from SPDX's lists ---------------------------------------------------------------

def test_every_mapped_id_is_an_spdx_license_or_exception():
    known = licensing().known_symbols
    ids = set(cr._OTHER.values()) | {base + suffix for base in cr._GNU.values() for suffix in ("-only", "-or-later")}
    for spdx in ids:
        assert spdx in known and not known[spdx].is_exception, spdx
        assert not spdx.startswith("LicenseRef-"), spdx
    for lower, spdx in cr._EXCEPTIONS.items():
        assert lower == spdx.lower() and spdx in known and known[spdx].is_exception, spdx
    assert "ssleay" not in cr._OTHER and not any("niv" in name for name in (*cr._OTHER, *cr._GNU))


# -- package_license: the file inside the tree, and only there ----------------------------------------------------

def tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "usr/share/doc").mkdir(parents=True)
    (root / "etc").mkdir()
    return root


def put(root: Path, name: str, text: str) -> Path:
    path = root / "usr/share/doc" / name / "copyright"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_package_license_reads_the_tree(tmp_path):
    root = tree(tmp_path)
    put(root, "libfoo1", dep5("GPL-2+", "Expat"))
    assert package_license(root, "libfoo1") == "GPL-2.0-or-later AND MIT"
    assert package_license(root, "libfoo1:amd64") == "GPL-2.0-or-later AND MIT"
    assert package_license(str(root), "libfoo1") == "GPL-2.0-or-later AND MIT"  # type: ignore[arg-type]
    assert package_license(root, "libbar1") == NOASSERTION  # no such package
    (root / "usr/share/doc/libbaz1").mkdir()
    assert package_license(root, "libbaz1") == NOASSERTION  # no copyright file


def test_the_doc_directory_as_a_relative_or_absolute_symlink(tmp_path):
    root = tree(tmp_path)
    put(root, "libfoo-common", dep5("LGPL-2.1+"))
    doc = root / "usr/share/doc"
    (doc / "libfoo1").symlink_to("libfoo-common")
    (doc / "libfoo2").symlink_to("../doc/./libfoo-common")
    (doc / "libfoo3").symlink_to("/usr/share/doc/libfoo-common")  # absolute: taken inside root
    (doc / "libfoo4").symlink_to("libfoo3")  # a chain
    for name in ("libfoo1", "libfoo2", "libfoo3", "libfoo4", "libfoo4:i386"):
        assert package_license(root, name) == "LGPL-2.1-or-later", name
    # the copyright file itself a symlink, relative and absolute
    (doc / "libqux1").mkdir()
    (doc / "libqux1/copyright").symlink_to("../libfoo-common/copyright")
    (doc / "libqux2").mkdir()
    (doc / "libqux2/copyright").symlink_to("/usr/share/doc/libfoo-common/copyright")
    assert package_license(root, "libqux1") == package_license(root, "libqux2") == "LGPL-2.1-or-later"
    # a symlinked /usr inside the tree (absolute target, taken inside root)
    (root / "usr").rename(root / "real-usr")
    (root / "usr").symlink_to("/real-usr")
    assert package_license(root, "libfoo4") == "LGPL-2.1-or-later"


def test_symlinks_never_leave_the_tree(tmp_path):
    root = tree(tmp_path)
    outside = tmp_path / "outside"  # a machine-readable file next to the tree: must never be read
    outside.mkdir()
    (outside / "copyright").write_text(dep5("Expat"))
    doc = root / "usr/share/doc"
    up = "../" * 12

    (doc / "climb").symlink_to(f"{up}outside")  # relative, climbing far above root: stops at root
    (doc / "absolute").symlink_to(outside)  # an absolute host path: taken inside root
    (doc / "file").mkdir()
    (doc / "file/copyright").symlink_to(f"{up}outside/copyright")
    for name in ("climb", "absolute", "file"):
        assert package_license(root, name) == NOASSERTION, name

    # /etc/passwd of the host is never read; the tree's own /etc/passwd is (it is where the link points)
    (doc / "passwd").mkdir()
    (doc / "passwd/copyright").symlink_to("/etc/passwd")
    (doc / "passwd-rel").mkdir()
    (doc / "passwd-rel/copyright").symlink_to(f"{up}etc/passwd")
    assert package_license(root, "passwd") == package_license(root, "passwd-rel") == NOASSERTION
    (root / "etc/passwd").write_text(dep5("ISC"))
    assert package_license(root, "passwd") == package_license(root, "passwd-rel") == "ISC"

    # the tree seen from inside: climbing to "the root" and back down lands inside root, not in tmp_path
    put(root, "real", dep5("Zlib"))
    (doc / "roundabout").symlink_to(f"{up}usr/share/doc/real")
    assert package_license(root, "roundabout") == "Zlib"
    (doc / "escape").symlink_to(f"{up}root/usr/share/doc/real")  # would work only from outside root
    assert package_license(root, "escape") == NOASSERTION


def test_symlink_loops_and_long_chains(tmp_path):
    root = tree(tmp_path)
    doc = root / "usr/share/doc"
    (doc / "loop1").symlink_to("loop2")
    (doc / "loop2").symlink_to("loop1")
    (doc / "self").symlink_to("self")
    assert package_license(root, "loop1") == package_license(root, "self") == NOASSERTION
    put(root, "end", dep5("MIT"))
    previous = "end"
    for i in range(cr.MAX_LINK_HOPS):
        (doc / f"hop{i}").symlink_to(previous)
        previous = f"hop{i}"
    assert package_license(root, f"hop{cr.MAX_LINK_HOPS - 1}") == "MIT"  # 16 hops
    (doc / "one-more").symlink_to(previous)
    assert package_license(root, "one-more") == NOASSERTION  # 17


def test_what_is_not_a_small_regular_utf8_file_is_noassertion(tmp_path):
    root = tree(tmp_path)
    doc = root / "usr/share/doc"
    (doc / "dir/copyright").mkdir(parents=True)
    (doc / "fifo").mkdir()
    os.mkfifo(doc / "fifo/copyright")  # must not block
    put(root, "latin1", "").write_bytes(dep5("MIT").encode() + "\nComment: caf\xe9\n".encode("latin-1"))
    put(root, "big", dep5("MIT") + "Comment: x\n" + " padding\n" * (cr.MAX_BYTES // 9))
    put(root, "just-small", dep5("MIT") + "Comment: x\n" + " padding\n" * ((cr.MAX_BYTES - 4096) // 9))
    assert (doc / "just-small/copyright").stat().st_size <= cr.MAX_BYTES < (doc / "big/copyright").stat().st_size
    (doc / "dangling").symlink_to("nowhere")
    (doc / "notdir").write_text("a file where a directory should be")
    (doc / "oldstyle").mkdir()
    (doc / "oldstyle/copyright").write_text("This package was debianized by Someone.\n\nLicense: GPL-2+\n")
    for name in ("dir", "fifo", "latin1", "big", "dangling", "notdir", "oldstyle"):
        assert package_license(root, name) == NOASSERTION, name
    assert package_license(root, "just-small") == "MIT"
    assert package_license(tmp_path / "no-such-root", "libfoo1") == NOASSERTION


@pytest.mark.parametrize("name", ["", ":amd64", "..", ".", "../../etc", "a/b", "/etc", "libfoo\x00", "Libfoo",
                                  None, 7])
def test_bad_package_names_are_noassertion(tmp_path, name):
    root = tree(tmp_path)
    put(root, "a", dep5("MIT"))
    (root / "usr/share/doc/copyright").write_text(dep5("MIT"))  # what "" or "." would find
    assert package_license(root, name) == NOASSERTION  # type: ignore[arg-type]


# -- the real copyright files of this host ------------------------------------------------------------------------

def test_the_copyright_files_of_this_host():
    doc = Path("/usr/share/doc")
    names = sorted(p.parent.name for p in doc.glob("*/copyright")) if doc.is_dir() else []
    if not names:
        pytest.skip("no /usr/share/doc/*/copyright on this host")
    mapped, unmapped = {}, []
    start = time.perf_counter()
    for name in names:
        try:
            data = (doc / name / "copyright").read_bytes()
            text = data.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            text = None
        result = expression(text) if text is not None else NOASSERTION
        assert isinstance(result, str)
        if text is not None and len(data) <= cr.MAX_BYTES:
            assert package_license(Path("/"), name) == result, name  # the host as a tree: the same answer
        if result == NOASSERTION:
            unmapped.append(name)
        else:
            mapped[name] = result
            assert_valid_spdx(result)
            assert expression(text) == result  # deterministic
    elapsed = time.perf_counter() - start
    assert len(mapped) >= 30, (len(mapped), len(unmapped))
    assert elapsed < 10, elapsed  # about 0.3 s for 800 packages, three times over
