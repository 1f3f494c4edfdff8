"""Command line. The only place where exceptions become exit codes and one-line messages."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from pathlib import Path

from tmplbuild import __version__
from tmplbuild.errors import ExitCode, TmplbuildError, UsageError
from tmplbuild.log import info


def default_cache_dir() -> Path:
    if os.environ.get("TMPLBUILD_CACHE_DIR"):
        return Path(os.environ["TMPLBUILD_CACHE_DIR"])
    if os.geteuid() == 0:
        return Path("/var/cache/tmplbuild")
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tmplbuild"


def find_recipe(arg: str) -> Path:
    """A recipe path, or a bare name looked up in ./recipes/."""
    path = Path(arg)
    if path.suffix == ".toml" or path.exists():
        return path
    candidate = Path("recipes") / f"{arg}.toml"
    if candidate.exists():
        return candidate
    raise UsageError("recipe", f"{arg}: no such file, and no recipes/{arg}.toml")


def cmd_build(args: argparse.Namespace) -> int:
    from tmplbuild.builder.builder import BuildOptions, build, default_arch
    from tmplbuild.recipe import load_recipe

    recipe = load_recipe(find_recipe(args.recipe))
    opts = BuildOptions(arch=args.arch or default_arch(recipe), out_dir=Path(args.out), cache_dir=Path(args.cache_dir or default_cache_dir()),
                        mirror=args.mirror, security_mirror=args.security_mirror, force=args.force, use_tmpfs=not args.no_tmpfs,
                        zstd_level=args.zstd_level, xz_level=args.xz_level)
    build(recipe, opts)
    return 0


def cmd_recipe_check(args: argparse.Namespace) -> int:
    """Every error of every recipe, one line each in file and line order; with --resolve, also each package the
    signed archive index does not have. Exit 2 if any."""
    from tmplbuild.recipe.load import RecipeErrors, load_recipe

    if not args.resolve:
        given = [flag for flag, value in (("--arch", args.arch), ("--mirror", args.mirror), ("--security-mirror",
                 args.security_mirror), ("--cache-dir", args.cache_dir)) if value is not None]
        if given:
            raise UsageError("check", f"{', '.join(given)}: only with --resolve")
    failed = False
    for name in args.recipes:
        path = find_recipe(name)
        try:
            recipe = load_recipe(path, all_errors=True)
            ok = f"{recipe.path}: ok ({recipe.name}, {recipe.suite}, {', '.join(recipe.architectures)})"
            if args.resolve:
                from tmplbuild.recipe.resolve import resolve_packages

                found = resolve_packages(recipe, path, cache_dir=Path(args.cache_dir or default_cache_dir()),
                                         arch=args.arch, mirror=args.mirror, security_mirror=args.security_mirror)
                if found.missing:
                    raise RecipeErrors(list(found.missing))
                ok += f", {found.packages} packages resolved for {found.arch} in {', '.join(found.suites)}"
        except RecipeErrors as exc:
            for error in exc.errors:
                print(f"tmplbuild: {error}", file=sys.stderr)
            failed = True
            continue
        print(ok)
    return int(ExitCode.USAGE) if failed else 0


def parse_duration(text: str) -> int:
    """`30d`, `12h`, `2w`, `1y` → seconds. Raises UsageError."""
    import re

    m = re.fullmatch(r"(\d+)([smhdwy])", text.strip())
    if not m or int(m.group(1)) == 0:
        raise UsageError("duration", f"found {text!r}, expected a number and a unit (s m h d w y), e.g. 30d")
    return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}[m.group(2)]


def _expires_in(args: argparse.Namespace) -> int:
    """--expires-in, within the lifetime clients accept (checked before anything is built, booted or signed).
    Raises UsageError."""
    from tmplbuild.repo.index import check_lifetime

    seconds = parse_duration(args.expires_in)
    check_lifetime(seconds)
    return seconds


_SIGNERS: list = []  # closed when the command ends: no gpg-agent tmplbuild started outlives it


def _signer(args: argparse.Namespace, forbidden: list[Path]):
    from tmplbuild.sign import Signer, default_gnupghome
    from tmplbuild.sign.keys import check_gnupghome_location

    home = Path(args.gnupghome) if args.gnupghome else default_gnupghome()
    check_gnupghome_location(home, forbidden)
    signer = Signer(home, args.key)
    _SIGNERS.append(signer)
    return signer, home


def read_passphrase(path: str | None, *, confirm: bool, why: str) -> str:
    """A passphrase from the first line of `path`, else asked on the terminal (twice when `confirm`). Raises
    UsageError(why) when there is neither."""
    import getpass

    if path:
        try:
            text = Path(path).read_text().split("\n", 1)[0].rstrip("\r")
        except OSError as exc:
            raise UsageError("passphrase", f"{path}: {exc.strerror}") from None
        if not text:
            raise UsageError("passphrase", f"{path}: the first line is empty")
        return text
    if not sys.stdin.isatty():
        raise UsageError("passphrase", why)
    first = getpass.getpass("passphrase: ")
    if not first:
        raise UsageError("passphrase", "empty")
    if confirm and getpass.getpass("passphrase (again): ") != first:
        raise UsageError("passphrase", "the two entries differ")
    return first


def cmd_key_generate(args: argparse.Namespace) -> int:
    from tmplbuild.sign import default_gnupghome, export_public, generate_key
    from tmplbuild.sign.keys import agents_stopped, check_gnupghome_location

    home = Path(args.gnupghome) if args.gnupghome else default_gnupghome()
    check_gnupghome_location(home, [])  # the private key stays out of any checkout
    if args.no_passphrase and args.passphrase_file:
        raise UsageError("passphrase", "give --passphrase-file FILE or --no-passphrase, not both")
    passphrase = None
    if args.passphrase_file or (args.role == "root" and not args.no_passphrase):
        passphrase = read_passphrase(args.passphrase_file, confirm=True, why="a root key is protected by a "
                                     "passphrase: give --passphrase-file FILE, run on a terminal, or pass "
                                     "--no-passphrase")
    fpr = generate_key(args.name, home, expire=args.expire, algo=args.algo, passphrase=passphrase)
    out = Path(args.out) if args.out else Path("keys") / f"{fpr}.asc"
    out.parent.mkdir(parents=True, exist_ok=True)
    with agents_stopped(home):
        out.write_bytes(export_public(fpr, home, armored=True))
    print(fpr)
    print(f"tmplbuild: private key in {home}; public key written to {out}", file=sys.stderr)
    return 0


def cmd_key_export(args: argparse.Namespace) -> int:
    from tmplbuild.sign import default_gnupghome, export_public
    from tmplbuild.sign.keys import agents_stopped

    home = Path(args.gnupghome) if args.gnupghome else default_gnupghome()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with agents_stopped(home):
        for armored, suffix in ((True, "asc"), (False, "gpg")):
            path = out / f"{args.key.upper()}.{suffix}"
            path.write_bytes(export_public(args.key, home, armored=armored))
            print(path)
    return 0


def _delta_count(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = -1
    if not 0 <= n <= 8:
        raise argparse.ArgumentTypeError(f"found {value!r}, expected a number of earlier versions from 0 to 8")
    return n


def _delta_args(p: argparse.ArgumentParser) -> None:
    # The default is tmplbuild.repo.deltas.DEFAULT_COUNT (None here: building the parser imports no index code).
    p.add_argument("--deltas", type=_delta_count, default=None, metavar="N",
                   help="also write deltas to each new tar.zst from the last N earlier versions of its template "
                        "and architecture (default 2; 0: none), so nodes holding one of them download only what "
                        "changed")


def cmd_publish(args: argparse.Namespace) -> int:
    paths = [Path(a) for a in args.artifacts]
    expires_in = _expires_in(args)
    oci = _oci_destination(args)
    _test_before_publishing(paths, args.skip_test)
    if args.to:
        from tmplbuild.repo.remote import publish_remote, read_token
        from tmplbuild.sign import export_public

        if not args.token_file:
            raise UsageError("publish", "--to needs --token-file")
        signer, home = _signer(args, [])
        # Pinned: the signing key itself, plus any --repo-key the maintainer trusts; never keys from the server.
        keys = export_public(signer.fingerprint, home, armored=False)
        pinned = [signer.fingerprint]
        for key_file in args.repo_key or []:
            from tmplbuild.repo.manage import fingerprints_in

            data = Path(key_file).read_bytes()
            keys += data
            pinned += fingerprints_in(data)
        result = publish_remote(args.to, paths, signer, keys, tuple(pinned), read_token(Path(args.token_file)),
                                expires_in, oci, args.deltas)
    else:
        from tmplbuild.repo.publish import publish

        if not args.repo:
            raise UsageError("publish", "give --repo DIR, or --to URL --token-file FILE")
        repo = Path(args.repo)
        signer, _ = _signer(args, [repo])
        result = publish(repo, paths, signer, expires_in, oci, args.deltas)
    for e in result.added:
        info(f"published {e.name} {e.version} {e.arch}: {', '.join(f.path for f in e.template_files)}")
        for d in e.deltas:
            assert d.delta is not None
            info(f"  delta from {d.delta.base_version}: {d.path} ({d.size} bytes, "
                 f"{100 * d.size / max(e.files[0].size, 1):.1f}% of the tar.zst)")
        if oci is not None:
            from tmplbuild.oci.record import tags

            info(f"pushed {e.name} {e.version} {e.arch}: {oci.repository(e.name)}:"
                  f"{{{','.join(tags(e.version, e.arch))}}}, signed (lookaside: sigstore/)")
    for key in result.unchanged:
        info(f"unchanged {' '.join(key)}: already published with the same content")
    for line in result.cleaned:
        info(f"cleaned up: {line}")
    if result.added:
        info(f"index version {result.index.version}, expires {result.index.expires}")
    else:
        info(f"nothing new to publish: index version {result.index.version} unchanged (expires "
              f"{result.index.expires}; `tmplbuild repo resign` extends it)")
    return 0


def _oci_destination(args: argparse.Namespace):
    """--oci REGISTRY/PATH with its options, checked before anything is built, booted or pushed; None without.
    Raises UsageError."""
    if not args.oci:
        if args.oci_authfile or args.oci_insecure_registry:
            raise UsageError("oci", "--oci-authfile and --oci-insecure-registry go with --oci REGISTRY/PATH")
        return None
    from tmplbuild.oci.publisher import Destination, check_destination

    check_destination(args.oci)  # with --oci-insecure-registry, every skopeo run says that TLS is off
    return Destination(prefix=args.oci.rstrip("/"), tls_verify=not args.oci_insecure_registry,
                       authfile=Path(args.oci_authfile) if args.oci_authfile else None)


def _oci_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("OCI registry (templates built with the \"oci\" format)")
    g.add_argument("--oci", metavar="REGISTRY/PATH",
                   help="also push each template's OCI image to REGISTRY/PATH/<name>, tagged <version>-<arch> and "
                        "latest-<arch>, and sign it (simple signing; the signatures go under sigstore/ in the "
                        "repository), before the index names it")
    g.add_argument("--oci-authfile", metavar="FILE",
                   help="registry credentials (skopeo's auth.json; default: skopeo's own, or $REGISTRY_AUTH_FILE)")
    g.add_argument("--oci-insecure-registry", action="store_true",
                   help="do not verify the registry's TLS certificate (or use plain HTTP): for a registry on "
                        "127.0.0.1 only; said on stderr every time")


def _test_before_publishing(paths: list[Path], skip: bool) -> None:
    """Every template boots in every container manager here before it is published; the result goes into its
    manifest (signed through the index). Raises TemplateTestError (exit 8) before anything is published."""
    import dataclasses

    from tmplbuild.boot.gate import test_record
    from tmplbuild.files import atomic_write
    from tmplbuild.repo.publish import load_artifact

    for path in paths:
        artifact = load_artifact(path)
        record = test_record(artifact.manifest, artifact.manifest_path, skip=skip)
        if artifact.manifest.test != record:
            atomic_write(artifact.manifest_path, dataclasses.replace(artifact.manifest, test=record).to_bytes())


def cmd_repo_init(args: argparse.Namespace) -> int:
    from tmplbuild.repo.manage import init

    repo = Path(args.dir)
    signer, home = _signer(args, [repo])
    index = init(repo, signer, home, args.id or repo.resolve().name.lower(), _expires_in(args))
    info(f"initialised {repo} (repo id {index.repo_id}, key {signer.fingerprint}, index version 1)")
    info(f"repository id: {index.repo_id}")
    if args.id is None:
        # Every client pins the id on first use, for good: say where it came from while it can still change.
        print(f"tmplbuild: note: the repository id {index.repo_id!r} was taken from the directory's name. Clients "
              f"pin it for good on first use; to choose another, remove {repo} now and run `tmplbuild repo init "
              f"{repo} --id ID` before anyone fetches from it.", file=sys.stderr)
    return 0


def cmd_repo_verify(args: argparse.Namespace) -> int:
    from tmplbuild.errors import ExitCode
    from tmplbuild.repo.manage import audit, fingerprints_in, repair, repair_hint
    from tmplbuild.sign.keys import normalise_fingerprint

    repo = Path(args.dir)
    data: bytes | None = None
    pinned: tuple[str, ...] = ()
    if args.key and args.root_key:
        raise UsageError("repo verify", "give --key (a repository's index key) or --root-key (its root keys), "
                                        "not both")
    if args.key:
        data = Path(args.key).read_bytes()
        pinned = tuple(args.fingerprint) if args.fingerprint else tuple(fingerprints_in(data))
    elif args.fingerprint:
        raise UsageError("repo verify", "--fingerprint pins a fingerprint of --key: give --key too")
    root_pins = tuple(normalise_fingerprint(f, "--root-key") for f in args.root_key or ())
    if args.repair:
        for line in repair(repo, data, pinned):
            print(f"repaired: {line}")
    findings = audit(repo, data, pinned, root_pins=root_pins)
    for line in findings:
        print(f"tmplbuild: repo verify: {line}", file=sys.stderr)
    hint = None if args.repair else repair_hint(repo, findings)
    if hint:
        print(f"tmplbuild: repo verify: {hint}", file=sys.stderr)
    if not findings:
        print(f"{repo}: ok")
        return 0
    only_freshness = all(f.kind == f.FRESHNESS for f in findings)
    return int(ExitCode.FRESHNESS if only_freshness else ExitCode.AUTHENTICITY)


def cmd_repo_prune(args: argparse.Namespace) -> int:
    from tmplbuild.repo.manage import prune

    repo = Path(args.dir)
    signer, _ = _signer(args, [repo])
    index, removed = prune(repo, args.keep, signer, _expires_in(args))
    for e in removed:
        print(f"removed {e.name} {e.version} {e.arch}")
    print(f"index version {index.version}, {len(index.templates)} template versions kept")
    return 0


def cmd_repo_resign(args: argparse.Namespace) -> int:
    from tmplbuild.repo.manage import resign

    repo = Path(args.dir)
    signer, _ = _signer(args, [repo])
    notes: list[str] = []
    index = resign(repo, signer, _expires_in(args), carry_over=args.carry_over, notes=notes)
    for line in notes:
        print(f"tmplbuild: warning: {line}", file=sys.stderr)
    print(f"index version {index.version}, expires {index.expires}")
    return 0


def cmd_repo_remove(args: argparse.Namespace) -> int:
    from tmplbuild.repo.manage import remove

    repo = Path(args.dir)
    signer, _ = _signer(args, [repo])
    notes: list[str] = []
    index, removed = remove(repo, args.name, args.version, args.arch, signer, _expires_in(args),
                            carry_over=args.carry_over, notes=notes)
    for line in notes:
        print(f"tmplbuild: warning: {line}", file=sys.stderr)
    for e in removed:
        print(f"removed {e.name} {e.version} {e.arch}")
    print(f"index version {index.version}, {len(index.templates)} template versions kept")
    return 0


def cmd_rebuild(args: argparse.Namespace) -> int:
    from tmplbuild.rebuild import LocalRepo, RebuildOptions, RemoteRepo, rebuild
    from tmplbuild.run import host_arch

    expires_in = _expires_in(args)
    oci = _oci_destination(args)
    if args.to:
        from tmplbuild.repo.remote import read_token
        from tmplbuild.sign import export_public

        if not args.token_file:
            raise UsageError("rebuild", "--to needs --token-file")
        signer, home = _signer(args, [Path(args.recipes)])
        repo = RemoteRepo(args.to, signer, export_public(signer.fingerprint, home, armored=False),
                          read_token(Path(args.token_file)), expires_in, oci, args.deltas)
    else:
        signer, _ = _signer(args, [Path(args.repo), Path(args.recipes)])
        repo = LocalRepo(Path(args.repo), signer, expires_in, oci, args.deltas)
    report = rebuild(repo, RebuildOptions(
        recipes_dir=Path(args.recipes), host_arch=host_arch(),
        cache_dir=Path(args.cache_dir or default_cache_dir()), out_dir=Path(args.out) if args.out else None,
        mirror=args.mirror, security_mirror=args.security_mirror, keep=args.keep, skip_test=args.skip_test))
    sys.stdout.write(report.json() if args.json else report.markdown())
    for row in report.rows:
        if row.result == "failed":
            print(f"tmplbuild: rebuild {row.template} {row.arch}: {row.details}", file=sys.stderr)
    return report.exit_code


def _signing_args(p: argparse.ArgumentParser, expires: bool = True) -> None:
    p.add_argument("--key", required=True, metavar="FINGERPRINT", help="signing key")
    p.add_argument("--gnupghome", help="the signing key's own GNUPGHOME (default: $TMPLBUILD_GNUPGHOME or "
                                       "~/.local/share/tmplbuild/gnupg); never inside the repository")
    if expires:
        p.add_argument("--expires-in", default="30d", help="index lifetime (default 30d)")


def cmd_test(args: argparse.Namespace) -> int:
    import json

    from tmplbuild.boot.runner import TestOptions, render, resolve_managers, test_artifact
    from tmplbuild.errors import EnvironmentUnfitError, TemplateTestError

    managers, explicit = resolve_managers(args.manager)
    if args.timeout <= 0:
        raise UsageError("--timeout", f"found {args.timeout:g}, expected a positive number of seconds")
    if args.dhcp_grace < 0:
        raise UsageError("--dhcp-grace", f"found {args.dhcp_grace:g}, expected zero or more seconds")
    if args.jobs is not None and args.jobs < 1:
        raise UsageError("--jobs", f"found {args.jobs}, expected 1 or more managers at a time")
    opts = TestOptions(managers=managers, explicit=explicit, timeout=args.timeout, grace=args.dhcp_grace,
                       apt_mirror=args.apt_mirror, workdir=Path(args.work_dir) if args.work_dir else None,
                       tmpfs=not args.no_tmpfs, jobs=args.jobs or 0)
    report = test_artifact(Path(args.artifact), opts)
    print(json.dumps(report.as_dict(), indent=2, sort_keys=True) if args.json else render(report), flush=True)
    if report.failed:
        failed = [f"{m.manager}: {', '.join(c.name for c in m.checks if c.status == 'fail')}" for m in report.failed]
        raise TemplateTestError("template test", f"{Path(args.artifact).name} failed {'; '.join(failed)}")
    if report.status != "pass":
        raise EnvironmentUnfitError("template test", "no container manager could be tested here: "
                                + "; ".join(f"{m.manager}: {m.reason}" for m in report.managers))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from tmplbuild.serve import parse_size, serve

    serve(Path(args.repo), args.host, args.port, args.workers,
          Path(args.token_file) if args.token_file else None, parse_size(args.max_upload))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tmplbuild", description="Build, sign, publish and fetch OS templates.")
    p.add_argument("--version", action="version", version=f"tmplbuild {__version__}")
    sub = p.add_subparsers(dest="verb", required=True)

    b = sub.add_parser("build", help="build a template from a recipe")
    b.add_argument("recipe", help="recipe file, or a name in ./recipes/")
    b.add_argument("--arch", help="architecture to build (default: the host's, if the recipe lists it)")
    b.add_argument("--out", default="out", help="output directory (default: ./out)")
    b.add_argument("--cache-dir", help="shared package cache (default: /var/cache/tmplbuild as root, "
                                       "or $TMPLBUILD_CACHE_DIR)")
    b.add_argument("--mirror", help="Debian mirror URL (default: $TMPLBUILD_MIRROR, the recipe, the host's apt "
                                    "sources)")
    b.add_argument("--security-mirror", help="Debian security mirror, for *-security extra suites (default: "
                                             "$TMPLBUILD_SECURITY_MIRROR, the recipe, the host's apt sources)")
    b.add_argument("--force", action="store_true", help="replace an existing template of the same version")
    b.add_argument("--zstd-level", type=int, default=9, choices=range(1, 23), metavar="1-22",
                   help="zstd level (default 9, with a 128 MiB long-distance window; 19 is near xz's size, slower)")
    b.add_argument("--xz-level", type=int, default=0, choices=range(0, 10), metavar="0-9",
                   help="xz level for recipes with tar.xz (default 0: 4 s instead of 28 s for -6, 31%% larger)")
    b.add_argument("--no-tmpfs", action="store_true", help="build on disk instead of a tmpfs (low-memory hosts)")
    b.set_defaults(func=cmd_build)

    k = sub.add_parser("key", help="signing keys").add_subparsers(dest="key_verb", required=True)
    kg = k.add_parser("generate", help="make a signing key in a dedicated GNUPGHOME")
    kg.add_argument("--name", required=True, help='user id, e.g. "Example Templates <templates@example.org>"')
    kg.add_argument("--gnupghome")
    kg.add_argument("--expire", default="2y", help="key lifetime (gpg syntax: 2y, 365d, never)")
    kg.add_argument("--algo", default="ed25519")
    kg.add_argument("--out", help="public key file (default keys/<FINGERPRINT>.asc)")
    kg.add_argument("--role", choices=("online", "root"), default="online",
                    help="online: CI's index key, no passphrase (default); root: a root key, kept offline, "
                         "protected by a passphrase (asked on the terminal, or --passphrase-file)")
    kg.add_argument("--passphrase-file", metavar="FILE", help="the passphrase, on the file's first line")
    kg.add_argument("--no-passphrase", action="store_true", help="a root key without a passphrase (not advised)")
    kg.set_defaults(func=cmd_key_generate)
    ke = k.add_parser("export", help="export a public key, armored (.asc) and binary (.gpg, for gpgv/systemd)")
    ke.add_argument("--key", required=True, metavar="FINGERPRINT")
    ke.add_argument("--gnupghome")
    ke.add_argument("--out-dir", default="keys")
    ke.set_defaults(func=cmd_key_export)

    pb = sub.add_parser("publish", help="add built templates to a signed repository")
    pb.add_argument("artifacts", nargs="+", help="a built .tar.zst or its .manifest.json")
    pb.add_argument("--skip-test", action="store_true",
                    help="publish without booting the template first (`tmplbuild test`), for hosts that cannot run "
                         "containers; reported loudly and recorded in the manifest")
    where = pb.add_mutually_exclusive_group(required=True)
    where.add_argument("--repo", help="local repository directory")
    where.add_argument("--to", metavar="URL", help="repository server (tmplbuild serve) to upload to")
    pb.add_argument("--token-file", help="with --to: file holding the upload token")
    pb.add_argument("--repo-key", action="append", metavar="FILE",
                    help="with --to: another maintainer's public key to accept on the server's current index")
    _delta_args(pb)
    _signing_args(pb)
    _oci_args(pb)
    pb.set_defaults(func=cmd_publish)

    r = sub.add_parser("repo", help="create, audit and maintain a repository").add_subparsers(
        dest="repo_verb", required=True)
    ri = r.add_parser("init", help="create an empty signed repository")
    ri.add_argument("dir")
    ri.add_argument("--id", help="repository id clients pin (default: the directory name)")
    _signing_args(ri)
    ri.set_defaults(func=cmd_repo_init)
    rv = r.add_parser("verify", help="audit every file, hash and signature; exit 3 on any finding")
    rv.add_argument("dir")
    rv.add_argument("--key", help="public key file to verify with (default: the repository's keys/)")
    rv.add_argument("--fingerprint", action="append", help="pin only this fingerprint of --key (repeatable)")
    rv.add_argument("--root-key", action="append", metavar="FPR",
                    help="a root key fingerprint the repository's roots must anchor on (repeatable; default: its "
                         "own root/1.root.json, self-signed)")
    rv.add_argument("--repair", action="store_true",
                    help="first remove what the signed index does not list (files an interrupted publish left, "
                         "empty directories, staging) under the repository lock, then audit")
    rv.set_defaults(func=cmd_repo_verify)
    rp = r.add_parser("prune", help="keep the newest N versions of each template and architecture")
    rp.add_argument("dir")
    rp.add_argument("--keep", type=int, required=True)
    _signing_args(rp)
    rp.set_defaults(func=cmd_repo_prune)
    rr = r.add_parser("resign", help="re-sign the index with a new version and expiry")
    rr.add_argument("dir")
    rr.add_argument("--carry-over", action="store_true",
                    help="after a new root dropped the key that signed the index in place: re-sign its entries "
                         "(index, .asc, SHA256SUMS.gpg) with this key; review them first (repo verify, list)")
    _signing_args(rr)
    rr.set_defaults(func=cmd_repo_resign)
    rm = r.add_parser("remove", help="drop a template version (one arch or all) and its files, and re-sign")
    rm.add_argument("dir")
    rm.add_argument("name")
    rm.add_argument("version")
    rm.add_argument("--arch", help="only this architecture (default: every one)")
    rm.add_argument("--carry-over", action="store_true",
                    help="as for resign: the index in place was signed by a key the newest root dropped")
    _signing_args(rm)
    rm.set_defaults(func=cmd_repo_remove)

    rb = sub.add_parser("rebuild", help="rebuild every recipe whose inputs changed and publish what differs")
    rb.add_argument("--recipes", default="recipes", metavar="DIR", help="recipe directory (default ./recipes)")
    rb.add_argument("--skip-test", action="store_true",
                    help="publish without booting each template first (`tmplbuild test`); reported loudly and "
                         "recorded in the manifest")
    rwhere = rb.add_mutually_exclusive_group(required=True)
    rwhere.add_argument("--repo", metavar="DIR", help="local repository directory")
    rwhere.add_argument("--to", metavar="URL", help="repository server (tmplbuild serve) to upload to")
    rb.add_argument("--token-file", help="with --to: file holding the upload token")
    rb.add_argument("--keep", type=int, metavar="N", help="then prune to the newest N versions (local only)")
    rb.add_argument("--cache-dir", help="shared package cache (default as for build)")
    rb.add_argument("--out", metavar="DIR", help="where builds go (default: a temporary directory)")
    rb.add_argument("--mirror", help="Debian mirror URL (default as for build)")
    rb.add_argument("--security-mirror", help="Debian security mirror URL (default as for build)")
    rb.add_argument("--json", action="store_true", help="the summary as JSON instead of a Markdown table")
    _delta_args(rb)
    _signing_args(rb)
    _oci_args(rb)
    rb.set_defaults(func=cmd_rebuild)

    c = sub.add_parser("check", help="parse and validate recipes without building (every error, one line each)")
    c.add_argument("recipes", nargs="+")
    c.add_argument("--resolve", action="store_true",
                   help="also resolve the packages against the signed Debian archive index (needs the mirror; "
                        "writes only the index cache) and name each one it lacks")
    c.add_argument("--arch", help="with --resolve: the architecture (default: the host's, if the recipe lists it)")
    c.add_argument("--mirror", help="with --resolve: Debian mirror URL (default as for build)")
    c.add_argument("--security-mirror", help="with --resolve: Debian security mirror URL (default as for build)")
    c.add_argument("--cache-dir", help="with --resolve: where the verified indices are cached (default as for build)")
    c.set_defaults(func=cmd_recipe_check)

    t = sub.add_parser("test", help="boot a template in throwaway containers and check that it works")
    t.add_argument("artifact", help="a template: .tar.zst, .tar.xz, or the .oci.tar image (built or fetched)")
    t.add_argument("--manager", action="append", metavar="NAME",
                   help="nspawn, lxc, lxc-unprivileged, proxmox, proxmox-privileged or all (default; repeatable or "
                        "comma-separated). "
                        "Managers missing here are skipped under `all` and an error when named")
    t.add_argument("--timeout", type=float, default=60.0,
                   help="seconds per manager for boot, checks and shutdown of its two containers (default 60)")
    t.add_argument("--dhcp-grace", type=float, default=20.0,
                   help="seconds to wait for a DHCP lease once boot has finished (default 20)")
    t.add_argument("--apt-mirror", metavar="named|URL",
                   help="check apt-get update: `named` relays to the mirror the template's sources name, a URL "
                        "(file:///DIR, http://127.0.0.1:PORT) serves a local mirror fixture; default: apt skipped")
    t.add_argument("--work-dir", help="where the throwaway containers live (default /var/tmp), on a tmpfs mounted there")
    t.add_argument("--no-tmpfs", action="store_true", help="keep the containers' trees on disk (hosts short of memory)")
    t.add_argument("--jobs", type=int, metavar="N",
                   help="managers run side by side at most (default: the cores + 1; 1 runs them one after another)")
    t.add_argument("--json", action="store_true", help="print the report as JSON")
    t.set_defaults(func=cmd_test)

    sv = sub.add_parser("serve", help="serve a repository over HTTP (gunicorn), with authenticated uploads")
    sv.add_argument("repo", help="repository directory")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    sv.add_argument("--workers", type=int, default=2, help="worker processes, 16 threads each (default 2)")
    sv.add_argument("--token-file", help="file holding the upload token; without it uploads are disabled")
    sv.add_argument("--max-upload", default="2G", help="largest upload body accepted (default 2G; K/M/G/T)")
    sv.set_defaults(func=cmd_serve)

    from tmplbuild.client.commands import register as register_client

    register_client(sub)  # remote, list, fetch, verify: the node admin's verbs
    from tmplbuild.rootcmd import register as register_root

    register_root(sub)  # root init/next/sign/show/publish: the root key holders' verbs
    from tmplbuild.oci.commands import register as register_oci

    register_oci(sub)  # oci export/trust
    from tmplbuild.client.documents import register as register_documents

    register_documents(sub)  # sbom, show: what a published template is made of
    from tmplbuild.client.affected import register as register_affected

    register_affected(sub)  # affected: which templates carry a package
    from tmplbuild.completion import register as register_completion

    register_completion(sub)  # completion bash|zsh: the shell completion script, generated from this parser
    return p


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM (systemd stop, CI timeout) takes the same path as Ctrl-C: unmount, remove temporaries, exit.
    raise KeyboardInterrupt


def _run(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    finally:
        while _SIGNERS:
            _SIGNERS.pop().close()


def _add_quiet(p: argparse.ArgumentParser, top: bool = True) -> None:
    """-q/--quiet before or after the verb: on the top-level parser and on every verb's."""
    subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    if top or not subs:
        p.add_argument("-q", "--quiet", action="store_true", default=False if top else argparse.SUPPRESS,
                       help="no progress or informational lines (errors, warnings and requested output stay)")
    for sub in subs:
        for child in dict.fromkeys(sub.choices.values()):
            _add_quiet(child, top=False)


def _verb_parser(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The innermost subparser the parsed `args` went through (`repo init`, `remote add`, `fetch`...)."""
    while True:
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        chosen = getattr(args, subs[0].dest, None) if subs else None
        if chosen is None or chosen not in subs[0].choices:
            return p
        p = subs[0].choices[chosen]


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    try:
        top = parser()
        _add_quiet(top)
        args, unknown = top.parse_known_args(argv)
        if unknown:
            # An unknown option belongs to the verb the user typed: its usage, not the top-level one.
            _verb_parser(top, args).error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as exc:  # argparse: usage errors are exit 2 already, --help/--version exit 0
        return int(exc.code or 0)
    from tmplbuild import log

    log.QUIET = bool(getattr(args, "quiet", False))
    try:
        return _run(args)
    except TmplbuildError as exc:
        print(f"tmplbuild: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        print("tmplbuild: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place a bug becomes a message instead of a traceback
        if os.environ.get("TMPLBUILD_DEBUG"):
            traceback.print_exc()
        print(f"tmplbuild: internal error: {type(exc).__name__}: {exc} (a bug: please report it; "
              f"TMPLBUILD_DEBUG=1 shows the traceback)", file=sys.stderr)
        return int(ExitCode.INTERNAL)
