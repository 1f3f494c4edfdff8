"""`tmplbuild affected PACKAGE [--fixed VERSION]`: which template versions of a repository carry a package, or
carry it below the version that fixes it (tmplbuild.sbom.affected decides; the server's /api/v1/affected gives
the same answer).

Two sources:
- a remote (`--remote NAME`, or `--url URL` with its pins), through the Updater as `list` goes: the index passes
  checks 1-6, then each template version's manifest comes from the client's content-addressed cache
  (tmplbuild.client.manifests: `<state>/manifests/<sha256>`, used when the cached bytes have the signed size and
  sha256) or from the same mirror, capped at the signed size, checked, and only then cached. A mirror whose
  manifest fails is skipped like one whose index fails;
- a repository directory (`--repo DIR`): its index verified with the repository's own trust, as the server
  verifies it, and each manifest read from disk and checked against it.
Nothing is answered from bytes whose sha256 the signed index does not list.

Exit status: 0 when nothing is affected, 1 when something is (as grep and diff answer: `if ! tmplbuild affected
...`), else the typed errors' codes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tmplbuild.client.commands import _source, _source_args, _table
from tmplbuild.errors import AuthenticityError, LocalIOError, UsageError

if TYPE_CHECKING:
    from tmplbuild.manifest import Manifest
    from tmplbuild.repo import index as idx

Pairs = list[tuple["idx.Entry", "Manifest"]]


def cmd_affected(args: argparse.Namespace) -> int:
    import json

    from tmplbuild.sbom import affected

    q = affected.query(args.package, args.fixed, args.arch)
    if args.repo is not None:
        if args.remote or args.url or args.key or args.fingerprint or args.root_key or args.repo_id:
            raise UsageError("repo", "--repo DIR reads a local repository: not with --remote, --url, --key, "
                                     "--fingerprint, --root-key or --repo-id")
        index, pairs = _local(Path(args.repo), q.arch)
    else:
        index, pairs = _remote(args, q.arch)
    doc = affected.report(index, q, pairs)
    if args.json:
        print(json.dumps(doc, indent=2))
    elif doc["affected"]:
        rows = [("TEMPLATE", "VERSION", "ARCH", "PACKAGE", "INSTALLED", "SOURCE", "NEWEST")]
        rows += [(a["name"], a["version"], a["arch"], p["name"], p["version"], f"{p['source']}={p['source_version']}",
                  "yes" if a["newest"] else "no") for a in doc["affected"] for p in a["packages"]]
        _table(rows)
    wanted = q.package + (f" below {q.fixed}" if q.fixed else "")
    checked = f"{doc['checked']} template version{'' if doc['checked'] == 1 else 's'}"
    if not doc["affected"]:
        print(f"nothing affected: {checked} checked for {wanted}", file=sys.stderr)
        return 0
    top = sum(a["newest"] for a in doc["affected"])
    verb = "carries" if len(doc["affected"]) == 1 else "carry"
    print(f"affected: {len(doc['affected'])} of {checked} {verb} {wanted} ({top} of them the newest of their name "
          "and arch)", file=sys.stderr)
    return 1


def _remote(args: argparse.Namespace, arch: str | None) -> tuple[idx.Index, Pairs]:
    from tmplbuild.client.manifests import verified_manifest
    from tmplbuild.client.updater import Updater
    from tmplbuild.sbom import affected

    source = _source(args)

    def attempt(base: str):
        trusted = run.index(base)
        return trusted, [(e, verified_manifest(run.transport, base, e)) for e in affected.entries(trusted.index, arch)]

    with Updater(source) as run:
        trusted, pairs = run.over_mirrors(attempt)
        run.commit(trusted)
    return trusted.index, pairs


def _local(root: Path, arch: str | None) -> tuple[idx.Index, Pairs]:
    """The repository's index, verified with its own trust (its root chain, or keys/), and the manifests it lists,
    checked. Raises UsageError (no repository), AuthenticityError, FreshnessError (a root chain that rolls back),
    LocalIOError."""
    from tmplbuild.repo import chain, store
    from tmplbuild.sbom import affected

    if not root.is_dir():
        raise UsageError("repository", f"{root}: no such directory")
    try:
        with chain.repo_trust(root).base_verifier() as verifier:
            index, _ = store.load_index(root, verifier)
    except OSError as exc:
        raise LocalIOError("repository", f"{root}: {exc.strerror}") from None
    pairs = []
    for entry in affected.entries(index, arch):
        ref = entry.manifest
        try:
            with open(root / ref.path, "rb") as f:
                data = f.read(ref.size + 1)
        except FileNotFoundError:
            raise AuthenticityError("manifest", f"{root / ref.path}: missing, expected the manifest the index "
                                                "lists") from None
        except OSError as exc:
            raise LocalIOError("manifest", f"{root / ref.path}: {exc.strerror}") from None
        pairs.append((entry, affected.parsed(entry, data)))
    return index, pairs


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `affected` to tmplbuild's main subparsers."""
    a = subparsers.add_parser("affected", help="which template versions carry a package (below the version that "
                                               "fixes it); exit 1 when any does")
    a.add_argument("package", help="binary or source package name, e.g. openssl (advisories name source packages)")
    a.add_argument("--fixed", metavar="VERSION", help="the version that fixes it: only older ones count (dpkg "
                                                      "order; default: any version)")
    a.add_argument("--arch", help="only this architecture (default: every one)")
    a.add_argument("--json", action="store_true", help="machine-readable output")
    a.add_argument("--repo", metavar="DIR", help="a local repository directory instead of a remote")
    _source_args(a)
    a.set_defaults(func=cmd_affected)
