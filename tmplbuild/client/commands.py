"""The node admin's verbs: `remote`, `list`, `fetch`, `verify`.

`register(subparsers)` adds them to the main parser; each sets `func` (args -> exit code) and raises the typed
errors, which tmplbuild.cli.main turns into exit codes and one-line messages. There is no option that turns a
check off and no unsigned fallback: a mirror whose answer fails any check is skipped, and when every mirror
failed, the run fails.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING

from tmplbuild import log
from tmplbuild.errors import AuthenticityError, UsageError
from tmplbuild.log import info, say

if TYPE_CHECKING:
    from tmplbuild.client import updater

# The verbs import the trust core, gnupg and http.client when they run, not when the parser is built: `tmplbuild
# --help` and a mistyped option answer at once.

DEFAULT_DEST = "/var/lib/vz/template/cache"  # Proxmox VE's template cache: what pct and pveam read
ARCH = re.compile(r"\A[a-z0-9][a-z0-9-]*\Z")
# tmplbuild.repo.index.FORMATS but the documents (`tmplbuild sbom` fetches those); a test keeps them equal
FORMATS = ("tar.zst", "tar.xz", "lxc-meta.tar.xz", "oci.tar")


def _read_key(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError("key", f"cannot read {path}: {exc.strerror}") from None


def _source(args: argparse.Namespace) -> updater.Source:
    """The remote named by --remote (or the only one configured), or a one-off --url with --root-key, or with
    --key/--fingerprint."""
    from tmplbuild.client import updater

    if args.url:
        if args.remote:
            raise UsageError("remote", "give --remote NAME, or --url URL --root-key FPR (or --key FILE --fingerprint "
                                       "FPR), not both")
        if args.root_key:
            if args.key or args.fingerprint:
                raise UsageError("url", "give --root-key FPR (pin the root) or --key FILE --fingerprint FPR (pin the "
                                        "index key), not both")
            return updater.url_root_source(args.url, tuple(args.root_key), args.repo_id)
        if not args.key or not args.fingerprint:
            raise UsageError("url", "--url needs --root-key FPR, or --key FILE and --fingerprint FPR: keys are "
                                    "pinned, never fetched")
        return updater.url_source(args.url, _read_key(args.key), tuple(args.fingerprint), args.repo_id)
    if args.key or args.fingerprint or args.root_key or args.repo_id:
        raise UsageError("url", "--key, --fingerprint, --root-key and --repo-id go with --url URL (a configured "
                                "remote has its own)")
    return updater.remote_source(args.remote)


def _url(base: str, path: str) -> str:
    return f"{base}/{urllib.parse.quote(path, safe='/')}"


# -- remote ------------------------------------------------------------------------------------------------------

def cmd_remote_add(args: argparse.Namespace) -> int:
    from tmplbuild.client import config

    remote, path = config.add(args.name, args.urls, Path(args.key) if args.key else None, args.fingerprint,
                              args.repo_id, args.system, root_keys=args.root_key,
                              root_file=Path(args.root) if args.root is not None else None)
    if remote.pins_root:
        pinned = f"root keys {', '.join(remote.root_keys)}" + (f", root {remote.root}" if remote.root else "")
    else:
        pinned = f"key {remote.key}, pinned {', '.join(remote.fingerprints)}"
    info(f"added remote {remote.name} to {path}: {len(remote.urls)} URL(s), {pinned}"
          + (f", repo id {remote.repo_id}" if remote.repo_id else ""))
    return 0


def cmd_remote_remove(args: argparse.Namespace) -> int:
    from tmplbuild.client import config

    path = config.remove(config.check_name(args.name), args.system)
    info(f"removed remote {args.name} from {path}")
    return 0


def cmd_remote_list(args: argparse.Namespace) -> int:
    from tmplbuild.client import config

    remotes = config.load_all()
    if args.names:  # for scripts and shell completion: the names alone, nothing else (none configured: nothing)
        for name in sorted(remotes):
            print(name)
        return 0
    from tmplbuild.client import state, updater

    if not remotes and not args.json:
        say("no remotes configured")
        return 0
    rows = [("NAME", "URLS", "FINGERPRINTS", "REPO ID", "LAST INDEX", "TRUSTED ROOT", "CONFIG")]
    docs = []
    for name in sorted(remotes):
        r = remotes[name]
        source = updater.remote_source(name)
        seen = state.load(source.state_key, source.legacy_key)
        repo_id = r.repo_id or (f"{seen.repo_id} (learned)" if seen else "(first use)")
        stored = state.load_root(source.state_key, fallback=source.legacy_key) if r.pins_root else None
        if r.pins_root:
            pins = " ".join(f"root:{f}" for f in r.root_keys)
            trusted = f"{stored.version}, expires {stored.expires}" if stored else "(none yet)"
        else:
            pins, trusted = " ".join(r.fingerprints), "-"
        rows.append((name, " ".join(r.urls), pins, repo_id, str(seen.version) if seen else "-", trusted,
                     str(r.origin)))
        docs.append({"remote": name, "urls": list(r.urls), "root_keys": list(r.root_keys),
                     "fingerprints": list(r.fingerprints), "repo_id": r.repo_id or (seen.repo_id if seen else None),
                     "repo_id_pinned": r.repo_id is not None, "index_version": seen.version if seen else None,
                     "root": {"version": stored.version, "expires": stored.expires} if stored else None,
                     "config": str(r.origin) if r.origin else None})
    if args.json:
        import json

        print(json.dumps({"remotes": docs}, indent=2))
        return 0
    _table(rows)
    return 0


# -- list --------------------------------------------------------------------------------------------------------

def _entry_json(e) -> dict:
    return {
        "name": e.name, "version": e.version, "arch": e.arch, "distribution": e.distribution,
        "release": e.release, "variant": e.variant, "description": e.description, "created": e.created,
        "path": e.files[0].path, "size": e.files[0].size, "sha256": e.files[0].sha256, "sha512": e.files[0].sha512,
        "files": [{"format": f.format, "path": f.path, "size": f.size, "sha256": f.sha256, "sha512": f.sha512}
                  for f in e.files],
    }


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def cmd_list(args: argparse.Namespace) -> int:
    import json

    from tmplbuild.client import trust
    from tmplbuild.client.updater import Updater

    source = _source(args)
    with Updater(source) as run:
        trusted = run.refresh()
        run.commit(trusted)
        root = run.index_root
    index = trusted.index
    entries = sorted(index.templates, key=lambda e: (e.name, e.arch, trust.created_time(e), e.version))
    if args.name is not None:
        entries = [e for e in entries if e.name == args.name]
        if not entries:
            raise UsageError("template", f"no template {args.name} in index version {index.version} of "
                                         f"{source.label}{trust.did_you_mean(args.name, index)}")
    if args.json:
        doc = {"remote": source.remote, "url": source.urls[0], "repo_id": index.repo_id, "index_version": index.version,
               "generated": index.generated, "expires": index.expires, "signer": trusted.signer}
        if root is not None:  # a root-pinned source: the root the index was accepted under
            doc["root"] = {"version": root.version, "expires": root.expires, "online_keys": list(root.online.keys),
                           "online_threshold": root.online.threshold}
        doc["templates"] = [_entry_json(e) for e in entries]
        print(json.dumps(doc, indent=2))
        return 0
    if not entries:
        say(f"no templates in {source.label} (index version {index.version})")
        return 0
    rows = [("NAME", "VERSION", "ARCH", "SIZE", "CREATED")]
    rows += [(e.name, e.version, e.arch, _size(e.files[0].size), e.created) for e in entries]
    _table(rows)
    return 0


# -- fetch -------------------------------------------------------------------------------------------------------

def host_arch() -> str:
    from tmplbuild import run

    arch = run.host_arch() or ""
    if not ARCH.match(arch):
        raise UsageError("arch", "cannot tell the host architecture (dpkg --print-architecture): give --arch")
    return arch


def check_name_version(name: str, version: str | None) -> None:
    """A template name and version as the index spells them (fetch, sbom, show). Raises UsageError."""
    from tmplbuild.repo import index as idx

    if not idx.NAME.match(name):
        raise UsageError("template", f"found {name!r}, expected a template name (lowercase letters, digits, + - .)")
    if version is not None and not idx.VERSION.match(version):
        raise UsageError("version", f"found {version!r}, expected letters, digits and + - . ~")


FILE_NAME = re.compile(r"\A(?P<name>[a-z0-9][a-z0-9.+-]*)_(?P<version>[0-9A-Za-z][0-9A-Za-z.+~-]*)_"
                       r"(?P<arch>[a-z0-9][a-z0-9-]*)\.(?P<format>tar\.zst|tar\.xz|lxc-meta\.tar\.xz|oci\.tar)\Z")


def _understand_file_name(args: argparse.Namespace) -> None:
    """`fetch NAME_VERSION_ARCH.FORMAT` (a file name, as `list` and the page show them): the template, version,
    architecture and format it names. Raises UsageError when an option says otherwise."""
    m = FILE_NAME.match(args.name)
    if m is None:
        return
    for field in ("version", "arch", "format"):
        given = getattr(args, field)
        if given is not None and given != m[field]:
            raise UsageError(field, f"--{field} {given}, but the file name {args.name} names {m[field]}")
        setattr(args, field, m[field])
    args.name = m["name"]


def _refuse_unrunnable(arch: str) -> None:
    """Without --dest, fetch installs into this node's template cache: for this host. A template of an
    architecture it cannot run (neither natively nor through a qemu-user binfmt entry) is refused there, exit 2;
    with --dest DIR any architecture is fetched (a mirror, another host's cache)."""
    from tmplbuild import foreign

    try:
        foreign.emulator(arch)
    except foreign.CannotRun as exc:
        raise foreign.CannotRun(arch, f"{exc.why}; its containers would not start on this node, so it is not "
                                      f"installed into {DEFAULT_DEST}: give --dest DIR to fetch it for another "
                                      "host") from None


def cmd_fetch(args: argparse.Namespace) -> int:
    from tmplbuild.client import trust
    from tmplbuild.client.download import Progress, install
    from tmplbuild.client.updater import Updater
    from tmplbuild.errors import LocalIOError
    from tmplbuild.files import make_dirs, remove_empty_dirs

    _understand_file_name(args)
    check_name_version(args.name, args.version)
    arch = args.arch or host_arch()
    if not ARCH.match(arch):
        raise UsageError("arch", f"found {arch!r}, expected a Debian architecture name such as amd64")
    if args.dest is None:
        _refuse_unrunnable(arch)
    source = _source(args)
    dest = Path(DEFAULT_DEST if args.dest is None else args.dest)
    if args.dest is None and not dest.is_dir():
        # Not created: without --dest the template goes into Proxmox VE's cache, and when that is missing this
        # is most likely not a Proxmox VE node (or not the host meant); a directory nothing reads would only
        # hide that.
        raise UsageError("destination", f"{dest}: no such directory, expected Proxmox VE's template cache (the "
                                        "default; not created, since a missing one usually means this is not a "
                                        "Proxmox VE node or the path is wrong): give --dest DIR for another "
                                        "directory, which is created if missing")
    if os.path.lexists(dest) and not dest.is_dir():
        raise LocalIOError("destination", f"{dest}: not a directory")
    created: list[Path] = []

    fmt = args.format
    if args.oci:
        if fmt not in (None, "oci.tar"):
            raise UsageError("format", f"--oci fetches the oci.tar image, not --format {fmt}")
        fmt = "oci.tar"
    elif args.oci_authfile or args.oci_insecure_registry:
        raise UsageError("oci", "--oci-authfile and --oci-insecure-registry go with --oci")
    pulled = ""

    used: list[str] = []  # the mirror that passed

    def attempt(base: str):
        nonlocal pulled
        trusted = run.index(base)
        used[:] = [base]
        chosen = trust.select(trusted.index, args.name, version=args.version, arch=arch, fmt=fmt)
        if not dest.is_dir():  # a --dest the admin named: created once the index and entry have checked out
            created.extend(make_dirs(dest, 0o755, "destination"))
        if args.oci:
            from tmplbuild.client import ocifetch

            status, pulled = ocifetch.install(run.transport, base.rstrip("/"), chosen, dest,
                                              tls_verify=not args.oci_insecure_registry,
                                              authfile=Path(args.oci_authfile) if args.oci_authfile else None)
        else:
            from tmplbuild.client.download import present

            status = ""
            if not args.no_delta and chosen.ref.format == "tar.zst" and chosen.entry.deltas \
                    and not present(dest / chosen.filename, chosen.ref):
                status = _try_delta(run.transport, base, chosen, dest)
            if not status:
                status = install(run.transport, _url(base, chosen.ref.path), chosen.ref, dest, chosen.filename,
                                 Progress(chosen.filename, chosen.ref.size, enabled=False if log.QUIET else None))
        return trusted, chosen, status

    via_delta: list = []  # the delta applied, when one was

    def _try_delta(transport, base: str, chosen, dest: Path) -> str:
        """The template rebuilt from an earlier version here plus a signed delta (tmplbuild.client.delta), or ""
        to download the whole file (after saying why, when a delta was possible)."""
        from tmplbuild.client import delta

        search = [dest] + ([Path(DEFAULT_DEST)] if Path(DEFAULT_DEST).is_dir() and Path(DEFAULT_DEST) != dest else [])
        found = delta.find_base(chosen.entry, search)
        if found is None:
            return ""
        ref, base_file = found
        try:
            applied = delta.apply(transport, _url(base, ref.path), chosen.entry, chosen.ref, ref, base_file, dest,
                                  chosen.filename, False if log.QUIET else None)
        except delta.DeltaFailed as exc:
            print(f"tmplbuild: warning: delta from {base_file.name} not used: {exc}; downloading the whole file",
                  file=sys.stderr, flush=True)
            return ""
        via_delta[:] = [applied]
        return applied.status

    try:
        with Updater(source) as run:
            trusted, chosen, status = run.over_mirrors(attempt)
            run.commit(trusted)
    except BaseException:
        remove_empty_dirs(created)  # a failed run leaves no directory of its own behind (a kept .part stays)
        raise
    e, ref = chosen.entry, chosen.ref
    if source.remote is not None:
        from tmplbuild.client import state

        state.record_origin((dest / chosen.filename).absolute(), source.remote, ref.sha256)
    if args.json:
        import json

        print(json.dumps({"status": status,
                          "file": str((dest / chosen.filename).absolute()), "remote": source.remote,
                          "url": used[0], "repo_id": trusted.index.repo_id, "index_version": trusted.index.version,
                          "name": e.name, "version": e.version, "arch": e.arch, "format": ref.format,
                          "size": ref.size, "sha256": ref.sha256, "sha512": ref.sha512,
                          "oci_reference": pulled or None, "delta": _delta_json(via_delta, ref)}, indent=2))
        return 0
    what = "already present and verified" if status == "present" else "fetched and verified"
    if pulled and status != "present":
        what = f"pulled from {pulled} and verified"
    if via_delta:
        d = via_delta[0].delta
        what = (f"rebuilt from {via_delta[0].base.name} and a {d.size}-byte delta, and verified (downloaded "
                f"{100 * d.size / max(ref.size, 1):.1f}% of the file: {ref.size - d.size} bytes saved)")
    if status == "replaced":
        what += ", replacing the file there, which did not match the signed size and hashes"
    info(f"{dest / chosen.filename}: {what} ({e.name} {e.version} {e.arch}, {ref.size} bytes, sha256 {ref.sha256}, "
          f"index version {trusted.index.version} of {source.label})")
    return 0


def _delta_json(via_delta: list, ref) -> dict | None:
    if not via_delta:
        return None
    d = via_delta[0].delta
    return {"base_version": d.delta.base_version, "base_file": str(via_delta[0].base.absolute()),
            "path": d.path, "size": d.size, "saved": ref.size - d.size}


# -- verify ------------------------------------------------------------------------------------------------------

def _stored_online_keys(source: updater.Source, listing: str) -> tuple[bytes, tuple[str, ...]]:
    """The online keys of the root the client trusts for a root-pinned source. Raises UsageError when it trusts
    none yet (offline, there is nothing else to take them from); `listing` is the command that would fetch it."""
    from tmplbuild.client import state

    label = source.label
    doc = state.load_root(source.state_key, fallback=source.legacy_key)
    if doc is None:
        raise _no_root_yet(label, listing)
    return doc.material(doc.online), doc.online.keys


def _no_root_yet(label: str, listing: str) -> UsageError:
    return UsageError("root", f"{label} pins a root, and this client trusts no root of it yet: run `{listing}` "
                              "first (it fetches and checks the repository's roots)")


def _offline_keys(args: argparse.Namespace) -> tuple[bytes, tuple[str, ...]]:
    from tmplbuild.client import config, state, updater

    if args.root_key:
        if not args.url:
            raise UsageError("url", "--root-key goes with --url URL (the root this client trusts is kept per "
                                    "repository)")
        source = _source(args)  # UsageError for --key or --fingerprint as well
        listing = " ".join(["tmplbuild list", *(f"--url {u}" for u in source.urls),
                            *(f"--root-key {f}" for f in source.root_keys)])
        return _stored_online_keys(source, listing)
    if args.key or args.fingerprint:
        if not args.key or not args.fingerprint:
            raise UsageError("key", "give both --key FILE and --fingerprint FPR")
        return _read_key(args.key), tuple(args.fingerprint)
    if args.remote:
        r = config.get(args.remote)
        if r.pins_root:
            return _stored_online_keys(updater.remote_source(r.name), f"tmplbuild list --remote {r.name}")
        return r.key_material(), r.fingerprints
    remotes = config.load_all()
    if not remotes:
        raise UsageError("key", "no key to check the signature with: give --remote NAME or --key FILE "
                                "--fingerprint FPR")
    # Any configured remote's pinned key (or the online keys of the root it trusts) may have signed a template
    # the admin has on disk. A root remote this client trusts no root of yet has no keys to offer.
    parts: list[tuple[bytes, tuple[str, ...]]] = []
    waiting: list[str] = []
    for r in remotes.values():
        if not r.pins_root:
            parts.append((r.key_material(), r.fingerprints))
            continue
        source = updater.remote_source(r.name)
        doc = state.load_root(source.state_key, fallback=source.legacy_key)
        if doc is None:
            waiting.append(r.name)
        else:
            parts.append((doc.material(doc.online), doc.online.keys))
    if not parts:
        raise _no_root_yet(f"remote {waiting[0]}", f"tmplbuild list --remote {waiting[0]}")
    return (b"".join(m for m, _ in parts), tuple(dict.fromkeys(f for _, fprs in parts for f in fprs)))


def _remote_for(path: Path) -> str | None:
    """For `verify FILE` given no repository: the remote `fetch` recorded for the file, if still configured,
    else the only configured remote, else None."""
    from tmplbuild.client import config, state

    remotes = config.load_all()
    recorded = state.origin_of(path.absolute())
    if recorded in remotes:
        return recorded
    return next(iter(remotes)) if len(remotes) == 1 else None


def cmd_verify(args: argparse.Namespace) -> int:
    from tmplbuild.client import trust
    from tmplbuild.client.download import hash_file
    from tmplbuild.client.updater import Updater
    from tmplbuild.sign.verify import Verifier

    path = Path(args.file)
    if not path.is_file():
        raise UsageError("verify", f"{path}: no such file")
    asc = path.with_name(path.name + ".asc")
    if not (args.remote or args.url or asc.is_file()):
        args.remote = _remote_for(path)
    online = bool(args.remote or args.url)
    done: list[str] = []
    doc: dict = {"file": str(path.absolute()), "signature": None, "index": None}
    if asc.is_file():
        with open(asc, "rb") as f:
            signature = f.read(trust.SIGNATURE_CAP + 1)
        if len(signature) > trust.SIGNATURE_CAP:
            raise AuthenticityError("signature", f"{asc}: more than {trust.SIGNATURE_CAP} bytes, expected a "
                                                 "detached signature")
        keys, pins = _offline_keys(args)
        with Verifier(keys, pins) as verifier:
            verified = verifier.verify_file(path, signature)
        done.append(f"signature {asc.name} by {verified.fingerprint}")
        doc["signature"] = {"file": str(asc.absolute()), "signer": verified.fingerprint}
    if online:
        source = _source(args)
        size, sha256, sha512 = hash_file(path)

        def attempt(base: str):
            trusted = run.index(base)
            chosen = trust.find_file(trusted.index, path.name)
            if chosen is None:
                raise AuthenticityError("verify", f"{path.name}: not in the index (version {trusted.index.version})"
                                                  f", expected a file the index lists")
            trust.check_file(chosen.ref, size, sha256, sha512, path.name)
            return trusted, chosen, base

        with Updater(source) as run:
            trusted, chosen, base = run.over_mirrors(attempt)
            run.commit(trusted)
        done.append(f"size, sha256 and sha512 as in index version {trusted.index.version} of {source.label}")
        e, ref = chosen.entry, chosen.ref
        doc["index"] = {"remote": source.remote, "url": base, "repo_id": trusted.index.repo_id,
                        "index_version": trusted.index.version, "name": e.name, "version": e.version,
                        "arch": e.arch, "format": ref.format, "size": ref.size, "sha256": ref.sha256,
                        "sha512": ref.sha512}
    if not done:
        raise UsageError("verify", f"nothing to check {path} against: no {asc.name} next to it, no record of where "
                                   "it was fetched from, and no --remote NAME or --url URL")
    if args.json:
        import json

        print(json.dumps({"status": "ok", **doc}, indent=2))
        return 0
    info(f"{path}: ok ({'; '.join(done)})")
    return 0


# -- argparse ----------------------------------------------------------------------------------------------------

def _source_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("repository (a configured remote, or a one-off URL with its pinned root or key)")
    g.add_argument("--remote", metavar="NAME", help="configured remote (default: the only one configured)")
    g.add_argument("--url", action="append", metavar="URL", help="one-off repository URL (repeat: mirrors, in order)")
    g.add_argument("--root-key", action="append", metavar="FPR",
                   help="with --url: pinned root key fingerprint (repeatable; a threshold of them must sign a root)")
    g.add_argument("--key", metavar="FILE", help="with --url: the pinned public key file")
    g.add_argument("--fingerprint", action="append", metavar="FPR",
                   help="with --url: pinned primary key fingerprint (repeatable)")
    g.add_argument("--repo-id", metavar="ID", help="with --url: pinned repository id (else pinned on first use)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `remote`, `list`, `fetch` and `verify` to tmplbuild's main subparsers."""
    r = subparsers.add_parser("remote", help="configure repositories to fetch from, with their pinned keys")
    rs = r.add_subparsers(dest="remote_verb", required=True)
    ra = rs.add_parser("add", help="add a remote: mirror URLs and its pinned root keys (or the pinned index key "
                                   "file and fingerprint(s))")
    ra.add_argument("name")
    ra.add_argument("urls", nargs="+", metavar="URL", help="repository URL; more URLs are mirrors, tried in order")
    ra.add_argument("--root-key", action="append", metavar="FPR",
                    help="root key fingerprint to pin (repeatable): the client trusts the repository's root signed "
                         "by a threshold of them and follows its rotations")
    ra.add_argument("--root", metavar="FILE", help="a root document obtained out of band (copied into the config "
                                                   "directory): trusted as given; without --root-key, its root keys "
                                                   "are pinned")
    ra.add_argument("--key", metavar="FILE", help="instead of a root: the index signing key's public key file "
                                                  "obtained out of band (copied into the config directory)")
    ra.add_argument("--fingerprint", action="append", metavar="FPR",
                    help="with --key: primary key fingerprint to pin (repeatable); must be in --key")
    ra.add_argument("--repo-id", metavar="ID", help="repository id to pin (default: pinned on first use)")
    ra.add_argument("--system", action="store_true", help="write /etc/tmplbuild/remotes.toml instead of the "
                                                          "user's ~/.config/tmplbuild/remotes.toml")
    ra.set_defaults(func=cmd_remote_add)
    rr = rs.add_parser("remove", help="remove a remote")
    rr.add_argument("name")
    rr.add_argument("--system", action="store_true")
    rr.set_defaults(func=cmd_remote_remove)
    rl = rs.add_parser("list", help="show configured remotes")
    rl.add_argument("--names", action="store_true",
                    help="print only their names, one a line (nothing when none is configured): for scripts and "
                         "shell completion")
    rl.add_argument("--json", action="store_true", help="machine-readable output")
    rl.set_defaults(func=cmd_remote_list)

    ls = subparsers.add_parser("list", help="list the templates of a repository (after verifying its index)")
    ls.add_argument("name", nargs="?", help="only this template (every version and architecture)")
    _source_args(ls)
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=cmd_list)

    f = subparsers.add_parser("fetch", help="download and verify a template into the template cache")
    f.add_argument("name", help="template name, e.g. debian-12-minimal (or a file name such as "
                                "debian-12-minimal_12-20261204_amd64.tar.zst: its version, architecture and format)")
    f.add_argument("--version", help="template version (default: the newest by creation time)")
    f.add_argument("--arch", help="architecture (default: the host's, from dpkg --print-architecture); into the "
                                  "default destination only one this host runs, natively or through qemu-user")
    f.add_argument("--dest", metavar="DIR", help=f"destination directory, created if missing (default: {DEFAULT_DEST}, "
                                                 "Proxmox VE's template cache, which must exist)")
    f.add_argument("--format", choices=FORMATS, help="file format (default: the entry's primary, tar.zst)")
    f.add_argument("--json", action="store_true", help="machine-readable output: the file, its index entry, "
                                                        "fetched, present or replaced, and the delta used")
    f.add_argument("--no-delta", action="store_true",
                   help="download the whole file even when an earlier version here and a signed delta would "
                        "rebuild it from fewer bytes")
    f.add_argument("--oci", action="store_true",
                   help="take the OCI image (<stem>.oci.tar, what Proxmox VE 9.1 takes) from the registry the signed "
                        "manifest names, pulled by digest with skopeo and checked against the signed index")
    f.add_argument("--oci-authfile", metavar="FILE", help="with --oci: registry credentials (skopeo's auth.json)")
    f.add_argument("--oci-insecure-registry", action="store_true",
                   help="with --oci: do not verify the registry's TLS certificate (a registry on 127.0.0.1); the "
                        "image is still checked against the signed index")
    _source_args(f)
    f.set_defaults(func=cmd_fetch)

    v = subparsers.add_parser("verify", help="verify a local template: its .asc, and/or against a remote's index "
                                             "(by default the remote fetch took it from, else the only one)")
    v.add_argument("file")
    v.add_argument("--json", action="store_true", help="machine-readable output (the checks made, the index entry)")
    _source_args(v)
    v.set_defaults(func=cmd_verify)
