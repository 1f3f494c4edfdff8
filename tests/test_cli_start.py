"""The command line answers at once: building the parser (every `--help`, every mistyped option) imports
neither gnupg nor requests nor the trust core; the verbs import what they use when they run."""
from __future__ import annotations

import subprocess
import sys

from tmplbuild.client import commands, documents
from tmplbuild.repo import index


def test_help_imports_nothing_heavy():
    probe = ("import sys, contextlib, io\n"
             "from tmplbuild import cli\n"
             "with contextlib.redirect_stdout(io.StringIO()):\n"
             "    code = cli.main(['fetch', '--help'])\n"
             "heavy = sorted(m for m in ('gnupg', 'requests', 'urllib3', 'tmplbuild.client.trust', "
             "'tmplbuild.sign.verify', 'tmplbuild.repo.index') if m in sys.modules)\n"
             "print(code, ','.join(heavy))\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert proc.stdout.split() == ["0"], proc.stdout


def test_fetch_offers_exactly_the_index_formats():
    from tmplbuild.recipe.model import Compression

    assert commands.FORMATS == tuple(f for f in index.FORMATS if f not in index.DOCUMENT_FORMATS)
    assert tuple(documents.KINDS.values()) == index.DOCUMENT_FORMATS
    assert index.ROOTFS_FORMATS == tuple(c.file_format for c in Compression if c.is_rootfs_tar)
    assert index.OCI_FORMAT == Compression.OCI.file_format


def test_the_client_path_imports_no_recipe_parser():
    probe = ("import sys\n"
             "import tmplbuild.client.updater, tmplbuild.client.download, tmplbuild.sign.verify\n"
             "print(sorted(m for m in ('tmplbuild.recipe.load', 'tmplbuild.recipe.model', 'tomllib') "
             "if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]", proc.stdout
