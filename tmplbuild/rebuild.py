"""`tmplbuild rebuild`: the weekly job. Every recipe, every architecture this host can build:

1. plan: the input hash from the verified archive state, without building; equal to the newest published
   version's input hash → "skipped (inputs unchanged)".
2. build, as `<default version>`, or `<default version>.N` (smallest N ≥ 2 not yet published) when the default
   version is already taken.
3. compare with the newest published version's manifest: the same recipe (`recipe_sha256`), the same tmplbuild,
   the same package set (name, exact version, arch) and the same apt sources → "unchanged", not published. The archive's InRelease
   bytes are not part of this rule on purpose: Debian re-signs its Release files every day (Valid-Until), which
   changes the input hash but not one installed byte, and such a rebuild must not publish a new version.
4. otherwise boot it in every container manager here (`tmplbuild test`; a failure fails the row and publishes
   nothing), write the changelog and the test result into the manifest (before publishing: the manifest's
   sha256 is signed in the index) and publish it.
5. one recipe failing does not stop the others.
6. re-sign the index with a fresh expiry when nothing was published (a publish already does), then prune.
7. a Markdown (or JSON) summary; the exit code of the first failure.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import tempfile
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tmplbuild import foreign
from tmplbuild.builder.archive import version_compare
from tmplbuild.errors import AuthenticityError, ExitCode, TmplbuildError, UsageError
from tmplbuild.files import atomic_write
from tmplbuild.log import say
from tmplbuild.manifest import Manifest, ManifestError, Package
from tmplbuild.manifest import parse as parse_manifest
from tmplbuild.repo import index as idx

SKIPPED, UNCHANGED, PUBLISHED, FAILED = "skipped", "unchanged", "published", "failed"


# ----------------------------------------------------------------------------------------------- pure parts


def changelog(old: tuple[Package, ...] | None, new: tuple[Package, ...], previous_version: str | None) -> dict:
    """What changed between two package lists (a manifest's `packages`)."""
    before = {p.name: p.version for p in (old or ())}
    after = {p.name: p.version for p in new}
    log: dict = {"previous_version": previous_version, "added": [], "removed": [], "upgraded": [], "downgraded": []}
    for name in sorted(after.keys() - before.keys()):
        log["added"].append({"name": name, "version": after[name]})
    for name in sorted(before.keys() - after.keys()):
        log["removed"].append({"name": name, "version": before[name]})
    for name in sorted(before.keys() & after.keys()):
        cmp = version_compare(after[name], before[name])
        if cmp > 0:
            log["upgraded"].append({"name": name, "from": before[name], "to": after[name]})
        elif cmp < 0:
            log["downgraded"].append({"name": name, "from": before[name], "to": after[name]})
    # The same change by source package (what a security advisory names), from the same package data the SBOMs
    # are written from: each source whose version changed, with from/to (None: new, or gone).
    src_before = {p.source_name: p.source_ver for p in (old or ())}
    src_after = {p.source_name: p.source_ver for p in new}
    log["sources"] = [{"name": n, "from": src_before.get(n), "to": src_after.get(n)}
                      for n in sorted(src_before.keys() | src_after.keys()) if src_before.get(n) != src_after.get(n)]
    return log


def changelog_summary(log: dict) -> str:
    return (f"+{len(log['added'])} -{len(log['removed'])} ↑{len(log['upgraded'])} ↓{len(log['downgraded'])}"
            + (f" since {log['previous_version']}" if log.get("previous_version") else " (first version)"))


def same_content(new: Manifest, old: Manifest) -> bool:
    """The "unchanged" rule (see the module docstring): same recipe, same tmplbuild, same package set, same apt
    sources in the template (the host's mirror, when the recipe leaves them to it, may have changed)."""
    nb, ob = new.build, old.build
    return (nb.get("recipe_sha256") == ob.get("recipe_sha256") and nb.get("tmplbuild") == ob.get("tmplbuild")
            and new.package_set() == old.package_set() and new.apt_sources == old.apt_sources)


def newest(entries: list[idx.Entry]) -> idx.Entry | None:
    """The newest entry by `created`, then by dpkg version order (`12-20261122.2` after `12-20261122`)."""
    vkey = functools.cmp_to_key(version_compare)
    return max(entries, key=lambda e: (e.created, vkey(e.version)), default=None)


def pick_version(default: str, published: set[str]) -> str:
    """`default`, else `default.N` with the smallest N ≥ 2 not yet published."""
    if default not in published:
        return default
    n = 2
    while f"{default}.{n}" in published:
        n += 1
    return f"{default}.{n}"


@dataclass
class Row:
    template: str
    arch: str
    result: str
    version: str = ""
    details: str = ""
    exit_code: int = 0
    changelog: dict | None = None


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    index_version: int | None = None
    index_expires: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return next((r.exit_code for r in self.rows if r.result == FAILED), 0)

    def markdown(self) -> str:
        lines = ["| template | arch | result | version | details |", "|---|---|---|---|---|"]
        for r in self.rows:
            cells = [r.template, r.arch, r.result, r.version, r.details]
            lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
        lines.append("")
        if self.index_version is not None:
            lines.append(f"Index version {self.index_version}, expires {self.index_expires}.")
        lines += self.notes
        return "\n".join(lines) + "\n"

    def json(self) -> str:
        return json.dumps({"results": [asdict(r) for r in self.rows], "index_version": self.index_version,
                           "index_expires": self.index_expires, "notes": self.notes, "exit_code": self.exit_code},
                          indent=2, sort_keys=True) + "\n"


# ----------------------------------------------------------------------------------------------- repositories


class LocalRepo:
    def __init__(self, root: Path, signer, expires_in: int, oci=None, delta_count: int | None = None) -> None:
        """`oci`: a tmplbuild.oci.publisher.Destination every published template's image is pushed to;
        `delta_count`: publish's (None: its default)."""
        self.root, self.signer, self.expires_in, self.oci = root, signer, expires_in, oci
        self.delta_count = delta_count

    def index(self) -> idx.Index:
        """The index in place, read as a publisher reads it (chain.repo_trust: under the newest root or an earlier
        one of the chain). Each call also checks the signer against the newest root (an online key of it, the
        root not expired), so a run that could publish nothing fails before it builds anything. Raises
        UsageError, AuthenticityError ("signer"), FreshnessError ("root expired")."""
        from tmplbuild.repo import store
        from tmplbuild.repo.manage import writer_trust

        trust = writer_trust(self.root, self.signer, legacy_key_check=True)
        with trust.base_verifier() as verifier:
            current, _ = store.load_index(self.root, verifier)
        return current

    def manifest(self, entry: idx.Entry) -> Manifest:
        try:
            data = (self.root / entry.manifest.path).read_bytes()
        except OSError as exc:
            raise UsageError("repository", f"{entry.manifest.path}: {exc.strerror}") from None
        return _checked_manifest(entry, data)

    def publish(self, paths: list[Path]):
        from tmplbuild.repo.publish import publish

        return publish(self.root, paths, self.signer, self.expires_in, self.oci, self.delta_count)

    def resign(self) -> idx.Index:
        from tmplbuild.repo.manage import resign

        return resign(self.root, self.signer, self.expires_in)

    def prune(self, keep: int) -> tuple[idx.Index, list[idx.Entry]]:
        from tmplbuild.repo.manage import prune

        return prune(self.root, keep, self.signer, self.expires_in)


class RemoteRepo:
    """A repository server: its index verified with the signing key only (as `publish --to` does)."""

    def __init__(self, url: str, signer, pinned_keys: bytes, token: str, expires_in: int, oci=None,
                 delta_count: int | None = None) -> None:
        from tmplbuild.transport import Transport

        self.delta_count = delta_count
        self.base = url.rstrip("/")
        self.signer, self.pinned_keys, self.token, self.expires_in = signer, pinned_keys, token, expires_in
        self.oci = oci
        self.session = Transport()

    def _verified_index(self, verifier) -> idx.Index:
        from tmplbuild.repo.remote import fetch_pinned_index

        return fetch_pinned_index(self.session, self.base, verifier, (self.signer.fingerprint,))

    def index(self) -> idx.Index:
        from tmplbuild.sign import Verifier

        with Verifier(self.pinned_keys, (self.signer.fingerprint,)) as verifier:
            return self._verified_index(verifier)

    def manifest(self, entry: idx.Entry) -> Manifest:
        from tmplbuild.repo.remote import get_capped

        return _checked_manifest(entry, get_capped(self.session, f"{self.base}/{entry.manifest.path}"))

    def publish(self, paths: list[Path]):
        from tmplbuild.repo.remote import publish_remote

        return publish_remote(self.base, paths, self.signer, self.pinned_keys, (self.signer.fingerprint,),
                              self.token, self.expires_in, self.oci, self.delta_count)

    def resign(self) -> idx.Index:
        """The same catalogue, version + 1, fresh expiry, uploaded as an upload holding only the index pair
        (the server accepts it: every listed file is already served and checked against its signed hashes)."""
        from tmplbuild.repo.remote import _refusal, _tar, _upload, retry_conflicts
        from tmplbuild.sign import Verifier

        with Verifier(self.pinned_keys, (self.signer.fingerprint,)) as verifier:
            def attempt(n: int) -> idx.Index:
                current = self._verified_index(verifier)
                new = current.successor(current.templates, self.expires_in)
                data = new.to_bytes()
                sig = self.signer.sign(data, armored=True)
                verifier.verify(data, sig)
                staging = Path(tempfile.mkdtemp(prefix="tmplbuild-resign-"))
                body = staging.parent / f"{staging.name}.tar"
                try:
                    (staging / "index.json").write_bytes(data)
                    (staging / "index.json.asc").write_bytes(sig)
                    _tar(staging, body)
                    status, reply = _upload(self.session, f"{self.base}/api/v1/publish", body, self.token)
                finally:
                    body.unlink(missing_ok=True)
                    shutil.rmtree(staging, ignore_errors=True)
                if status == 200:
                    return new
                raise _refusal(status, reply)  # a 409 is a Conflict: retried with backoff until the deadline

            return retry_conflicts(attempt)

    def prune(self, keep: int):
        raise UsageError("prune", "not supported over --to; run `tmplbuild repo prune` on the server's directory")


def _checked_manifest(entry: idx.Entry, data: bytes) -> Manifest:
    got = hashlib.sha256(data).hexdigest()
    if len(data) != entry.manifest.size or got != entry.manifest.sha256:
        raise AuthenticityError("manifest hash", f"{entry.manifest.path}: size/sha256 {len(data)}/{got[:16]}…, the "
                                                 f"signed index says {entry.manifest.size}/{entry.manifest.sha256[:16]}…")
    try:
        return parse_manifest(data)
    except ManifestError as exc:
        raise AuthenticityError("manifest", f"{entry.manifest.path}: not a manifest ({exc})") from None


# ----------------------------------------------------------------------------------------------- the run


@dataclass
class RebuildOptions:
    recipes_dir: Path
    host_arch: str | None
    cache_dir: Path
    out_dir: Path | None = None  # None: a temporary directory, removed at the end
    mirror: str | None = None
    security_mirror: str | None = None
    keep: int | None = None
    skip_test: bool = False  # publish without `tmplbuild test` (loudly; recorded in the manifest)


def rebuild(repo, opts: RebuildOptions) -> Report:
    from tmplbuild.builder import chroot

    if not opts.recipes_dir.is_dir():
        raise UsageError("recipes", f"{opts.recipes_dir}: no such directory")
    if opts.keep is not None and opts.keep < 1:
        raise UsageError("rebuild", f"--keep {opts.keep}: expected at least 1")
    recipes = sorted(opts.recipes_dir.glob("*.toml"))
    repo.index()  # the repository must be there and verify before anything is built: else exit with its error
    chroot.enter_private_mount_namespace()  # before any thread starts (the builder's downloads, gpg pools)
    out = opts.out_dir or Path(tempfile.mkdtemp(prefix="tmplbuild-rebuild-"))
    report = Report()
    published = 0
    try:
        for path in recipes:
            published += _one_recipe(repo, path, opts, out, report)
    finally:
        if opts.out_dir is None:
            shutil.rmtree(out, ignore_errors=True)
    final: idx.Index | None = None
    try:
        final = repo.index() if published else repo.resign()
        if not published:
            report.notes.append("Nothing published: the index was re-signed with a fresh expiry.")
        if opts.keep is not None:
            final, removed = repo.prune(opts.keep)
            for e in removed:
                report.notes.append(f"Pruned {e.name} {e.version} {e.arch}.")
    except TmplbuildError as exc:
        report.rows.append(Row("(repository)", "-", FAILED, details=str(exc), exit_code=int(exc.exit_code)))
    if final is not None:
        report.index_version, report.index_expires = final.version, final.expires
    return report


def _one_recipe(repo, path: Path, opts: RebuildOptions, out: Path, report: Report) -> int:
    from tmplbuild.recipe import load_recipe

    try:
        recipe = load_recipe(path)
    except Exception as exc:  # noqa: BLE001 - one recipe failing must not stop the others
        report.rows.append(_failure(path.stem, "-", exc))
        return 0
    published = 0
    for arch in recipe.architectures:
        try:
            foreign.emulator(arch, opts.host_arch)  # another architecture builds through qemu-user, if registered
        except foreign.CannotRun as exc:
            report.rows.append(Row(recipe.name, arch, SKIPPED, details=f"cannot build {arch} here: {exc.why}"))
            continue
        try:
            row = _one_build(repo, recipe, arch, opts, out)
        except Exception as exc:  # noqa: BLE001
            row = _failure(recipe.name, arch, exc)
        report.rows.append(row)
        published += row.result == PUBLISHED
    return published


def _failure(name: str, arch: str, exc: BaseException) -> Row:
    if isinstance(exc, TmplbuildError):
        return Row(name, arch, FAILED, details=str(exc), exit_code=int(exc.exit_code))
    if os.environ.get("TMPLBUILD_DEBUG"):
        traceback.print_exception(exc)
    return Row(name, arch, FAILED, details=f"internal error: {type(exc).__name__}: {exc}",
               exit_code=int(ExitCode.INTERNAL))


def _one_build(repo, recipe, arch: str, opts: RebuildOptions, out: Path) -> Row:
    from tmplbuild.boot.gate import test_record
    from tmplbuild.builder.builder import BuildOptions, build, plan_inputs

    say(f"==> rebuild {recipe.name} {arch}")
    bopts = BuildOptions(arch=arch, out_dir=out, cache_dir=opts.cache_dir, mirror=opts.mirror,
                         security_mirror=opts.security_mirror, force=True)
    planned = plan_inputs(recipe, bopts)
    entries = [e for e in repo.index().templates if e.name == recipe.name and e.arch == arch]
    last = newest(entries)
    if last is not None and last.input_hash == planned.input_hash:
        return Row(recipe.name, arch, SKIPPED, last.version, "inputs unchanged")
    bopts.version = pick_version(planned.version, {e.version for e in entries})
    result = build(recipe, bopts)
    old = repo.manifest(last) if last is not None else None
    if old is not None and same_content(result.manifest, old):
        return Row(recipe.name, arch, UNCHANGED, last.version,
                   f"same recipe and packages as {last.version}; not published")
    manifest = dataclasses.replace(result.manifest, changelog=changelog(
        old.packages if old else None, result.manifest.packages, last.version if last else None))
    # Nothing untested is published: a failing check raises TemplateTestError (exit 8), the row fails, and the
    # last good version stays the newest in the index.
    manifest = dataclasses.replace(manifest, test=test_record(manifest, result.manifest_path,
                                                              skip=opts.skip_test))
    # The manifest is signed through its sha256 in the index: the changelog and the test result go in before
    # publishing.
    atomic_write(result.manifest_path, manifest.to_bytes())
    published = repo.publish([result.manifest_path])
    if not published.added:
        return Row(recipe.name, arch, UNCHANGED, bopts.version, "already published with the same content")
    return Row(recipe.name, arch, PUBLISHED, bopts.version, changelog_summary(manifest.changelog),
               changelog=manifest.changelog)
