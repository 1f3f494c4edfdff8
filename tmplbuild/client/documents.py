"""`tmplbuild sbom` and `tmplbuild show`: what a published template is made of, read from a remote after the
same checks as `fetch`.

`sbom` downloads a template's SPDX or CycloneDX SBOM or its SLSA provenance, a file the signed index lists like
the template itself: capped at its signed size, checked by size, sha256 and sha512 before one byte is written or
printed. `show` prints the template's entry and its package list from the manifest the index hashes."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tmplbuild.errors import UsageError

# The document of each kind: tmplbuild.repo.index.DOCUMENT_FORMATS, written out so that the parser does not import
# the index (a test keeps them equal); the server names them by the same kinds.
KINDS = {"spdx": "spdx.json", "cyclonedx": "cdx.json", "provenance": "intoto.json"}


def _select(args: argparse.Namespace, trusted, fmt: str | None):
    from tmplbuild.client import trust
    from tmplbuild.client.commands import host_arch

    return trust.select(trusted.index, args.name, version=args.version, arch=args.arch or host_arch(), fmt=fmt)


def cmd_sbom(args: argparse.Namespace) -> int:
    import hashlib

    from tmplbuild.client import trust
    from tmplbuild.client.commands import _source, _url, check_name_version
    from tmplbuild.client.updater import Updater
    from tmplbuild.files import atomic_write

    check_name_version(args.name, args.version)
    fmt = KINDS[args.format]
    out = Path(args.output) if args.output else None
    if out is not None and out.is_dir():
        raise UsageError("output", f"{out} is a directory, expected a file name")

    def attempt(base: str):
        trusted = run.index(base)
        chosen = _select(args, trusted, fmt)
        data = run.transport.get_bytes(_url(base, chosen.ref.path), chosen.ref.size, chosen.filename,
                                       document=True)
        trust.check_file(chosen.ref, len(data), hashlib.sha256(data).hexdigest(), hashlib.sha512(data).hexdigest(),
                         chosen.filename)
        return trusted, chosen, data

    with Updater(_source(args)) as run:
        trusted, chosen, data = run.over_mirrors(attempt)
        run.commit(trusted)
    if out is None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        atomic_write(out, data, check="output")
        e = chosen.entry
        print(f"{out}: {args.format} of {e.name} {e.version} {e.arch} ({len(data)} bytes, sha256 "
              f"{chosen.ref.sha256}, index version {trusted.index.version})", file=sys.stderr)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from tmplbuild.client.commands import _size, _source, check_name_version
    from tmplbuild.client.manifests import verified_manifest
    from tmplbuild.client.updater import Updater
    from tmplbuild.sbom.documents import package_rows

    check_name_version(args.name, args.version)

    def attempt(base: str):
        trusted = run.index(base)
        chosen = _select(args, trusted, None)
        return trusted, chosen, verified_manifest(run.transport, base, chosen.entry)

    with Updater(_source(args)) as run:
        trusted, chosen, manifest = run.over_mirrors(attempt)
        run.commit(trusted)
    e = chosen.entry
    rows = package_rows(manifest.packages)
    if args.json:
        print(json.dumps({"name": e.name, "version": e.version, "arch": e.arch, "created": e.created,
                          "description": e.description, "input_hash": e.input_hash,
                          "files": [{"format": f.format, "path": f.path, "size": f.size, "sha256": f.sha256}
                                    for f in e.files],
                          "build": manifest.build, "apt_sources": list(manifest.apt_sources),
                          "packages": rows}, indent=2))
        return 0
    print(f"{e.name} {e.version} {e.arch}: {e.description}")
    print(f"created {e.created}, index version {trusted.index.version}, input {e.input_hash}")
    for f in e.files:
        print(f"  {f.format:<16} {_size(f.size):>10}  {f.path.rsplit('/', 1)[-1]}")
    print(f"{len(rows)} packages:")
    table = [("NAME", "VERSION", "SOURCE", "LICENSE")] + [
        (r["name"], r["version"], r["source"] if r["source_version"] == r["version"] else
         f"{r['source']} {r['source_version']}", r["license"]) for r in rows]
    widths = [max(len(t[i]) for t in table) for i in range(3)]
    for t in table:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(t[:3], widths)) + "  " + t[3])
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from tmplbuild.client.commands import _source_args

    s = subparsers.add_parser("sbom", help="a template's SBOM (SPDX or CycloneDX) or SLSA provenance, verified")
    s.add_argument("name", help="template name, e.g. debian-12-minimal")
    s.add_argument("--format", choices=sorted(KINDS), default="spdx",
                   help="spdx (SPDX 2.3 JSON, the default), cyclonedx (CycloneDX 1.5 JSON) or provenance (in-toto "
                        "Statement with a SLSA v1 predicate)")
    s.add_argument("--version", help="template version (default: the newest by creation time)")
    s.add_argument("--arch", help="architecture (default: the host's)")
    s.add_argument("-o", "--output", metavar="FILE", help="write to FILE (default: standard output)")
    _source_args(s)
    s.set_defaults(func=cmd_sbom)
    sh = subparsers.add_parser("show", help="a template's entry and package list (from its verified manifest)")
    sh.add_argument("name", help="template name, e.g. debian-12-minimal")
    sh.add_argument("--version", help="template version (default: the newest by creation time)")
    sh.add_argument("--arch", help="architecture (default: the host's)")
    sh.add_argument("--json", action="store_true", help="machine-readable output")
    _source_args(sh)
    sh.set_defaults(func=cmd_show)
