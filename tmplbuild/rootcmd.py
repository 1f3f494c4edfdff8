"""`tmplbuild root`: the root of trust's verbs, for the root key holders (tmplbuild.repo.root).

A root is drafted, signed by each holder on their own machine, and published; the root keys' GNUPGHOMEs are
never needed on CI or the server:

    root init OUT --repo-id ID --root-key A.asc --root-key B.asc --root-key C.asc --threshold 2 \\
                  --online-key CI.asc                       # draft root 1
    root next root/1.root.json OUT --remove-online OLDFPR --add-online NEW.asc      # draft root N+1
    root next root/1.root.json OUT --expires-in 1y          # the same keys, a new expiry ("re-sign")
    root sign OUT --key FPR --gnupghome HOLDER_HOME         # appends one signature to OUT.asc
    root show OUT [--repo DIR]                              # what it names, which thresholds it meets
    root publish OUT --repo DIR | --to URL --token-file F   # checked by TUF's rule, then put in place

Public keys are given as armored files (`tmplbuild key export` writes them), one key each; the root embeds them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tmplbuild.errors import UsageError

ARMORED_KEY = b"-----BEGIN PGP PUBLIC KEY BLOCK-----"


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(what, f"cannot read {path}: {exc.strerror}") from None


def _key_file(path: str) -> tuple[str, bytes]:
    """(fingerprint, armored public key) of a key file holding exactly one public key. Raises UsageError."""
    from tmplbuild.repo.manage import fingerprints_in
    from tmplbuild.sign.verify import Verifier

    data = _read(path, "key")
    if not data.lstrip().startswith(ARMORED_KEY):
        raise UsageError("key", f"{path}: expected an armored public key (.asc, as `tmplbuild key export` writes)")
    fprs = fingerprints_in(data)
    if len(fprs) != 1:
        raise UsageError("key", f"{path}: {len(fprs)} keys, expected exactly one")
    with Verifier(data, fprs):  # public keys only, strong enough: the checks every verifier makes
        pass
    return fprs[0], data


def _duration(text: str) -> int:
    from tmplbuild.cli import parse_duration
    from tmplbuild.repo.root import check_lifetime

    seconds = parse_duration(text)
    check_lifetime(seconds)
    return seconds


def _online_threshold(k: int) -> int:
    """The document and every verifier support k of n online signatures on the index; `tmplbuild publish` signs
    with one key, so a root asking more could publish nothing. Raises UsageError."""
    if k != 1:
        raise UsageError("online keys", f"threshold {k}: tmplbuild publishes with one online key, so the online "
                                        "threshold is 1 (name several online keys to let any of them sign)")
    return k


def _write_new(path: Path, data: bytes) -> None:
    """A draft goes to a new file; a stale signature file beside it would not sign it, so it must not exist."""
    from tmplbuild.files import atomic_write

    sig = Path(f"{path}.asc")
    if sig.exists():
        raise UsageError("root", f"{sig} exists: it signs an earlier draft; remove it or write elsewhere")
    atomic_write(path, data)


def cmd_init(args: argparse.Namespace) -> int:
    from tmplbuild.client.config import check_repo_id
    from tmplbuild.repo import root

    keys: dict[str, bytes] = {}
    root_fprs, online_fprs = [], []
    for paths, out in ((args.root_key, root_fprs), (args.online_key, online_fprs)):
        for p in paths:
            fpr, data = _key_file(p)
            keys[fpr] = data
            out.append(fpr)
    if set(root_fprs) & set(online_fprs):
        raise UsageError("root", "a key is both a root key and an online key: the root keys stay offline")
    data = root.render(check_repo_id(args.repo_id), 1, keys, root.role(root_fprs, args.threshold, "root keys"),
                       root.role(online_fprs, _online_threshold(args.online_threshold), "online keys"),
                       _duration(args.expires_in))
    out = Path(args.out)
    _write_new(out, data)
    print(f"{out}: {root.parse(data).describe()}; now sign it: tmplbuild root sign {out} --key FPR")
    return 0


def cmd_next(args: argparse.Namespace) -> int:
    from tmplbuild.repo import root

    prev = root.parse(_read(args.previous, "root"))
    keys = {f: prev.key(f) for f, _ in prev.keys}
    root_fprs, online_fprs = list(prev.root.keys), list(prev.online.keys)
    for paths, fprs in ((args.add_root, root_fprs), (args.add_online, online_fprs)):
        for p in paths or []:
            fpr, data = _key_file(p)
            if fpr in fprs:
                raise UsageError("root", f"{fpr} is already in root {prev.version}")
            keys[fpr] = data
            fprs.append(fpr)
    for removals, fprs, what in ((args.remove_root, root_fprs, "root key"),
                                 (args.remove_online, online_fprs, "online key")):
        for value in removals or []:
            from tmplbuild.sign.keys import normalise_fingerprint

            fpr = normalise_fingerprint(value)
            if fpr not in fprs:
                raise UsageError("root", f"{fpr} is not a {what} of root {prev.version}")
            fprs.remove(fpr)
    if set(root_fprs) & set(online_fprs):
        raise UsageError("root", "a key is both a root key and an online key: the root keys stay offline")
    threshold = args.threshold if args.threshold is not None else min(prev.root.threshold, len(root_fprs))
    online_threshold = _online_threshold(args.online_threshold if args.online_threshold is not None
                                         else min(prev.online.threshold, len(online_fprs)))
    data = root.render(prev.repo_id, prev.version + 1, {f: keys[f] for f in {*root_fprs, *online_fprs}},
                       root.role(root_fprs, threshold, "root keys"),
                       root.role(online_fprs, online_threshold, "online keys"), _duration(args.expires_in))
    out = Path(args.out)
    _write_new(out, data)
    new = root.parse(data)
    print(f"{out}: {new.describe()}")
    print(f"it needs {prev.root.threshold} signature(s) by the root keys of root {prev.version} "
          f"({', '.join(prev.root.keys)}) and {new.root.threshold} by its own ({', '.join(new.root.keys)}): "
          f"tmplbuild root sign {out} --key FPR")
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    from tmplbuild.repo import root
    from tmplbuild.sign import Signer, default_gnupghome
    from tmplbuild.sign.keys import check_gnupghome_location

    path = Path(args.file)
    data = _read(path, "root")
    doc = root.parse(data)
    sig_path = Path(f"{path}.asc")
    existing = sig_path.read_bytes() if sig_path.exists() else b""
    if existing:
        root.split_signatures(existing, str(sig_path))  # appends only to a well-formed file
    home = Path(args.gnupghome) if args.gnupghome else default_gnupghome()
    check_gnupghome_location(home, [])
    from tmplbuild.cli import read_passphrase

    # A root key has a passphrase (`key generate --role root`): from --passphrase-file, else asked on the
    # terminal once gpg said it needs one; without either, the error says how to give it.
    passphrase = read_passphrase(args.passphrase_file, confirm=False, why="") if args.passphrase_file else None
    while True:
        with Signer(home, args.key, passphrase) as signer:
            if signer.fingerprint in {f for f, _ in doc.keys} and signer.fingerprint in doc.online.keys \
                    and signer.fingerprint not in doc.root.keys:
                raise UsageError("root", f"{signer.fingerprint} is an online key of root {doc.version}; roots are "
                                         "signed by root keys")
            try:
                signature = signer.sign(data, armored=True)
                break
            except UsageError as exc:
                if "passphrase" not in exc.message.lower() or passphrase is not None:
                    raise
                if not sys.stdin.isatty():
                    raise UsageError("passphrase", f"key {signer.fingerprint} has a passphrase: give "
                                                   "--passphrase-file FILE, or run on a terminal") from None
        passphrase = read_passphrase(None, confirm=False, why="")
    from tmplbuild.files import atomic_write

    atomic_write(sig_path, existing + (b"" if not existing or existing.endswith(b"\n") else b"\n") + signature)
    count = len(root.split_signatures(existing + signature, str(sig_path)))
    print(f"{sig_path}: signed by {signer.fingerprint} ({count} signature(s) now)")
    return 0


def _show(args: argparse.Namespace) -> int:
    from tmplbuild.repo import root

    path = Path(args.file)
    data = _read(path, "root")
    doc = root.parse(data)
    print(doc.describe())
    for title, role in (("root keys", doc.root), ("online keys", doc.online)):
        print(f"{title} (threshold {role.threshold}):")
        for fpr in role.keys:
            print(f"  {fpr}")
    sig_path = Path(f"{path}.asc")
    if not sig_path.exists():
        print(f"{sig_path}: no signature yet")
        return 0
    sig = sig_path.read_bytes()
    checks = [("its own root keys", doc, doc.root)]
    if args.repo and doc.version > 1:
        from tmplbuild.repo import chain

        prev = chain.read_chain(Path(args.repo))
        if len(prev) >= doc.version - 1:
            before = prev[doc.version - 2]
            checks.insert(0, (f"the root keys of root {before.version}", before, before.root))
    for title, source, role in checks:
        count = root.count_signatures(data, sig, source, role, str(sig_path))
        state = "met" if len(count.good) >= role.threshold else "NOT met"
        print(f"signed by {len(count.good)} of {role.threshold} needed {title}: {state} "
              f"({', '.join(count.good) or 'none'})")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    path = Path(args.file)
    data, sig = _read(path, "root"), _read(f"{path}.asc", "root signature")
    if args.to:
        from tmplbuild.repo.remote import publish_root_remote, read_token

        if not args.token_file:
            raise UsageError("root publish", "--to needs --token-file")
        version = publish_root_remote(args.to, data, sig, read_token(Path(args.token_file)))
        print(f"published root {version} to {args.to}")
        return 0
    if not args.repo:
        raise UsageError("root publish", "give --repo DIR, or --to URL --token-file FILE")
    from tmplbuild.repo import chain

    new, lines = chain.install(Path(args.repo), data, sig)
    for line in lines:
        print(line)
    print(f"published {new.describe()}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    r = subparsers.add_parser("root", help="the root of trust: root keys (offline) and the online keys they "
                                           "allow to sign the index").add_subparsers(dest="root_verb", required=True)
    i = r.add_parser("init", help="draft root 1 of a repository")
    i.add_argument("out", help="where the draft goes, e.g. 1.root.json")
    i.add_argument("--repo-id", required=True, help="the repository id (as `repo init --id` set it)")
    i.add_argument("--root-key", action="append", required=True, metavar="FILE",
                   help="armored public key of a root key holder (repeat for m of n)")
    i.add_argument("--threshold", type=int, default=1, metavar="M", help="root keys needed to sign a root (1)")
    i.add_argument("--online-key", action="append", required=True, metavar="FILE",
                   help="armored public key allowed to sign the index, e.g. CI's (repeatable)")
    i.add_argument("--online-threshold", type=int, default=1, metavar="K",
                   help="online keys needed on an index (default 1)")
    i.add_argument("--expires-in", default="1y", help="root lifetime (default 1y, at most 5 years)")
    i.set_defaults(func=cmd_init)

    n = r.add_parser("next", help="draft the next root: rotate keys, change thresholds, or renew the expiry")
    n.add_argument("previous", help="the current root document (e.g. REPO/root/3.root.json)")
    n.add_argument("out", help="where the draft goes")
    n.add_argument("--add-root", action="append", metavar="FILE", help="add a root key (armored public key)")
    n.add_argument("--remove-root", action="append", metavar="FPR", help="drop a root key")
    n.add_argument("--threshold", type=int, metavar="M", help="root keys needed (default: as before)")
    n.add_argument("--add-online", action="append", metavar="FILE", help="add an online key (armored)")
    n.add_argument("--remove-online", action="append", metavar="FPR",
                   help="drop an online key: indexes it signs are refused by clients that see this root")
    n.add_argument("--online-threshold", type=int, metavar="K", help="online keys needed (default: as before)")
    n.add_argument("--expires-in", default="1y", help="lifetime of the new root (default 1y)")
    n.set_defaults(func=cmd_next)

    s = r.add_parser("sign", help="add one root key holder's signature to FILE.asc")
    s.add_argument("file")
    s.add_argument("--key", required=True, metavar="FINGERPRINT", help="the holder's root key")
    s.add_argument("--gnupghome", help="the root key's own GNUPGHOME (offline; never CI's or the server's)")
    s.add_argument("--passphrase-file", metavar="FILE", help="the root key's passphrase, on the file's first line "
                                                             "(default: asked on the terminal)")
    s.set_defaults(func=cmd_sign)

    sh = r.add_parser("show", help="what a root names and which signature thresholds it meets")
    sh.add_argument("file")
    sh.add_argument("--repo", metavar="DIR", help="also count signatures by the previous root of this repository")
    sh.set_defaults(func=_show)

    p = r.add_parser("publish", help="put a signed root into a repository (checked by TUF's rules first)")
    p.add_argument("file", help="the root document; its signatures are FILE.asc")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--repo", metavar="DIR", help="local repository directory")
    where.add_argument("--to", metavar="URL", help="repository server (tmplbuild serve)")
    p.add_argument("--token-file", help="with --to: file holding the upload token")
    p.set_defaults(func=cmd_publish)

