"""`tmplbuild build`: one recipe, one architecture, to a compressed template and its manifest.

Reads as the list of steps it is: archive, resolve, download, bootstrap, scripts, clean-up, manifest, pack,
compress. Each step prints its duration. Nothing reaches the output directory until every step succeeded."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tmplbuild import __version__, foreign
from tmplbuild.builder import archive, chroot, lxcmeta, normalize, pack, plaindeb
from tmplbuild.builder.manifest import inventory
from tmplbuild.builder.mirror import host_proxies, resolve_mirror, template_mirror
from tmplbuild.builder.plan import BootstrapPlan, debootstrap_argv, lists_name, make_plan, missing_packages
from tmplbuild.errors import AuthenticityError, BuildError, LocalIOError, UsageError
from tmplbuild.files import atomic_write
from tmplbuild.log import say, step
from tmplbuild.manifest import Manifest, ManifestArtifact, Package
from tmplbuild.oci import record
from tmplbuild.oci.image import ImageMeta
from tmplbuild.recipe.model import Compression, Recipe, Stage
from tmplbuild.repo.index import DOCUMENT_FORMATS, CYCLONEDX_FORMAT, PROVENANCE_FORMAT, SPDX_FORMAT
from tmplbuild.run import run
from tmplbuild.sbom import documents


APT_SIGNATURE_ERRORS = ("NO_PUBKEY", "is not signed", "BADSIG", "EXPKEYSIG", "REVKEYSIG",
                        "signatures couldn't be verified", "The following signatures were invalid")


@dataclass
class BuildOptions:
    arch: str
    out_dir: Path
    cache_dir: Path
    mirror: str | None = None
    security_mirror: str | None = None
    force: bool = False
    use_tmpfs: bool = True
    zstd_level: int = pack.ZSTD_LEVEL
    xz_level: int = pack.XZ_LEVEL
    version: str | None = None  # overrides default_version (tmplbuild rebuild: `<default>.N`)


@dataclass
class BuildResult:
    artifacts: list[pack.Artifact]
    manifest_path: Path
    manifest: Manifest
    timings: dict[str, float] = field(default_factory=dict)


def artifact_stem(recipe: Recipe, version: str, arch: str) -> str:
    return f"{recipe.name}_{version}_{arch}"


def default_version(recipe: Recipe, epoch: int) -> str:
    """The recipe's own version, else `<release>-<archive date>`: the same archive state gives the same
    version, so a rebuild is reproducible down to its file name."""
    return recipe.version or f"{recipe.release}-{time.strftime('%Y%m%d', time.gmtime(epoch))}"


def input_hash(recipe: Recipe, arch: str, releases: list[archive.ReleaseInfo], sources: str = "") -> str:
    """What the template is made from: the resolved recipe (with its parents, scripts, files and keys), the
    architecture, the builder's version, the template's own apt sources (resolved from the host when the recipe
    leaves them to it; the build mirror is not an input: it changes no byte of the template), and the archive
    state as the signed sha256 of each Packages index the build reads. Not the InRelease bytes: a security suite is re-signed daily (Valid-Until) without one package
    changing, and that must not count as a new input (the weekly rebuild skips on an equal input hash)."""
    h = hashlib.sha256()
    indices = [r.files.get(f"{c}/binary-{arch}/Packages", (r.inrelease_sha256, 0))[0].encode()
               for r in releases for c in recipe.bootstrap.components]
    for part in (recipe.canonical, arch.encode(), __version__.encode(), sources.encode(), *indices):
        h.update(len(part).to_bytes(8, "big") + part)
    return "sha256:" + h.hexdigest()


@dataclass(frozen=True)
class PlannedInputs:
    """What a build of (recipe, opts) would be made from, known before building."""

    input_hash: str
    epoch: int
    version: str  # opts.version, else the default version
    suites: list[SuiteSource]
    sources: str  # the template's /etc/apt/sources.list
    mirror: str  # the build mirror


def plan_inputs(recipe: Recipe, opts: BuildOptions, fetcher: archive.Fetcher | None = None,
                mirror: str | None = None) -> PlannedInputs:
    """Resolve the mirror, fetch and verify the suites' InRelease, and derive the input hash, the epoch and the
    version, without building. build() uses this too, so the two never disagree. Raises UsageError,
    AuthenticityError, TransportError."""
    fetcher = fetcher or archive.Fetcher()
    mirror = mirror or resolve_mirror(opts.mirror, recipe.bootstrap.mirror)
    suites = _fetch_suites(fetcher, recipe, mirror, opts)
    releases = [s.release for s in suites]
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH") or max(r.epoch for r in releases))
    sources = template_sources(recipe)
    return PlannedInputs(input_hash=input_hash(recipe, opts.arch, releases, sources), epoch=epoch,
                         version=opts.version or default_version(recipe, epoch), suites=suites, sources=sources,
                         mirror=mirror)


def template_sources(recipe: Recipe) -> str:
    """The template's /etc/apt/sources.list: every suite it was built from, from the recipe's `[sources]`
    mirrors (else the host's), never from the mirror the build downloaded through. Raises UsageError."""
    components = " ".join(recipe.bootstrap.components)
    proxies = host_proxies()  # asks apt-config: once, not per mirror
    mirror = template_mirror(recipe.sources.mirror, proxies=proxies)
    lines = []
    for suite in (recipe.suite, *recipe.bootstrap.extra_suites):
        url = template_mirror(recipe.sources.security_mirror, security=True, proxies=proxies) \
            if suite.endswith("-security") else mirror
        lines.append(f"deb {url} {suite} {components}\n")
    return "".join(lines)


def build(recipe: Recipe, opts: BuildOptions) -> BuildResult:
    """Raises UsageError (recipe, configuration), AuthenticityError (archive signature or hashes),
    TransportError (mirror), BuildError (debootstrap or a script failed), UnsafeContentError (private keys
    in the tree), LocalIOError (output or cache not writable)."""
    if opts.arch not in recipe.architectures:
        raise UsageError("arch", f"{opts.arch} is not among the recipe's architectures "
                                 f"({', '.join(recipe.architectures)})")
    if not chroot.is_root():
        raise UsageError("build", "building a template needs root (debootstrap, chroot and mounts)")
    # Another architecture's dpkg and scripts run through qemu-user (binfmt_misc): refused here, before anything
    # is written, when this host has no such entry.
    foreign.emulator(opts.arch)
    mirror = resolve_mirror(opts.mirror, recipe.bootstrap.mirror)
    for d in (opts.out_dir, opts.cache_dir):
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LocalIOError("output", f"{d}: {exc.strerror}") from None
    chroot.enter_private_mount_namespace()
    timings: dict[str, float] = {}
    fetcher = archive.Fetcher()

    with step("archive", timings):
        planned = plan_inputs(recipe, opts, fetcher, mirror)
        suites, epoch, version = planned.suites, planned.epoch, planned.version
        stem = artifact_stem(recipe, version, opts.arch)
    finals = [opts.out_dir / f"{stem}.{fmt.file_format}" for fmt in recipe.formats]
    manifest_path = opts.out_dir / f"{stem}.manifest.json"
    meta_path = opts.out_dir / f"{stem}.{lxcmeta.FORMAT}" if Compression.XZ in recipe.formats else None
    doc_paths = [opts.out_dir / f"{stem}.{fmt}" for fmt in DOCUMENT_FORMATS]
    existing = [p for p in finals + doc_paths + [manifest_path, meta_path] if p is not None and p.exists()]
    if existing and not opts.force:
        raise UsageError("output", f"{existing[0]} exists; pass --force to replace it")

    with step("resolve", timings):
        indices, plan, trimmed = _resolve(fetcher, recipe, opts, suites, mirror)
    with step("download", timings):
        debs = archive.download_debs(fetcher, mirror, list(plan.debs), opts.cache_dir)
        say(f"    {len(debs)} packages, {sum(p.size for p in plan.debs) / 1e6:.1f} MB in {opts.cache_dir}")

    workbase = opts.cache_dir / "build"
    workbase.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{stem}.", dir=workbase))
    try:
        with (chroot.tmpfs(work) if opts.use_tmpfs else _plain_dir(work)):
            root = work / "rootfs"
            log = work / "build.log"
            try:
                with step("bootstrap", timings):
                    _bootstrap(root, work, mirror, recipe, opts.arch, suites, indices, plan, trimmed, debs, log)
                env = {"SOURCE_DATE_EPOCH": str(epoch), "TMPLBUILD_TEMPLATE": recipe.name,
                       "TMPLBUILD_VERSION": version, "TMPLBUILD_ARCH": opts.arch, "TMPLBUILD_SUITE": recipe.suite}
                with step("scripts", timings):
                    _customise(root, recipe, env, log)
                    # The template's own sources, whatever mirror or proxy the build downloaded through.
                    (root / "etc/apt/sources.list").write_text(planned.sources)
                with step("inventory", timings):
                    # Before the clean-up, which empties the apt lists a script's packages are looked up in.
                    known = {(p.name, p.version, p.arch): (p.sha256, f"{p.base_url or mirror}/{p.filename}")
                             for p in plan.debs}
                    packages = inventory(root, known, [x.url for x in suites]
                                         + [u for r in recipe.repositories for u in r.uris])
                with step("clean-up", timings):
                    if chroot.mounts_under(root):
                        raise BuildError("clean-up", f"mounts still active under {root}; refusing to clean")
                    normalize.clean(root, epoch)
                    normalize.refuse_private_keys(root)
                with step("pack + compress", timings):
                    outputs = [(fmt, final.with_name(f".{final.name}.part"))
                               for final, fmt in zip(finals, recipe.formats)]
                    image = ImageMeta(name=recipe.name, version=version, arch=opts.arch,
                                      description=recipe.description, revision=planned.input_hash, epoch=epoch)
                    entries, content_bytes, staged = pack.pack(root, outputs, epoch, opts.zstd_level,
                                                               opts.xz_level, image)
            except BaseException:
                _keep_log(log, opts.cache_dir / "logs" / f"{stem}.build.log")
                # debootstrap's own log says which package failed to configure, and why; its path in the
                # error message is gone with the tree.
                _keep_log(root / "debootstrap/debootstrap.log", opts.cache_dir / "logs" / f"{stem}.debootstrap.log")
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    try:
        if meta_path is not None:
            # lxc-create -t local reads the rootfs as tar.xz plus this metadata tarball.
            staged.append(_stage_bytes(meta_path, lxcmeta.FORMAT, lxcmeta.meta_tarball(
                recipe.name, version, opts.arch, recipe.distribution, recipe.description, epoch)))
            finals.append(meta_path)
        image_record = next((record.built(f.name, a.oci) for a, f in zip(staged, finals) if a.oci is not None), None)
        manifest = Manifest(
            name=recipe.name, version=version, arch=opts.arch, distribution=recipe.distribution,
            release=recipe.release, suite=recipe.suite, variant=recipe.variant, description=recipe.description,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch)), source_date_epoch=epoch,
            build={
                "input_hash": planned.input_hash,
                "recipe_sha256": hashlib.sha256(recipe.canonical).hexdigest(),
                "extends": list(recipe.extends),
                "archive": [{"suite": x.suite, "codename": x.release.codename, "date": x.release.date,
                             "inrelease_sha256": x.release.inrelease_sha256} for x in suites],
                "bootstrap_variant": recipe.bootstrap.variant,
                # Where this build downloaded from: not an input (the template names its own sources below).
                "mirror": planned.mirror,
                "security_mirror": next((x.url for x in suites if x.suite.endswith("-security")), None),
                "zstd_level": opts.zstd_level,
                "xz_level": opts.xz_level if Compression.XZ in recipe.formats else None,
                "tmplbuild": __version__,
            },
            apt_sources=tuple(planned.sources.splitlines()),
            tree={"entries": entries, "content_bytes": content_bytes},
            packages=tuple(Package(**p) for p in packages),
            artifacts=tuple(ManifestArtifact(file=f.name, format=a.format, size=a.size, sha256=a.sha256,
                                             sha512=a.sha512) for a, f in zip(staged, finals)),
            oci=image_record,
        )
        with step("sbom + provenance", timings):
            staged_docs = _documents(manifest, doc_paths, suites,
                                     [fmt.file_format for fmt in recipe.formats])
        staged += staged_docs
        finals += doc_paths
        manifest = dataclasses.replace(manifest, artifacts=manifest.artifacts + tuple(
            ManifestArtifact(file=f.name, format=a.format, size=a.size, sha256=a.sha256, sha512=a.sha512)
            for a, f in zip(staged_docs, doc_paths)))
        # All formats land together, the manifest last: a reader that sees the manifest sees every file.
        for a, final in zip(staged, finals):
            os.replace(a.path, final)
    except BaseException as exc:
        for a in staged:
            a.path.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise LocalIOError("output", f"{opts.out_dir}: {exc.strerror}") from None
        raise
    artifacts = [pack.Artifact(path=final, format=a.format, size=a.size, sha256=a.sha256, sha512=a.sha512,
                               oci=a.oci) for a, final in zip(staged, finals)]
    atomic_write(manifest_path, manifest.to_bytes())
    for a in artifacts:
        say(f"==> {a.path} {a.size / 1e6:.1f} MB sha256 {a.sha256}")
    say(f"==> {manifest_path} ({len(packages)} packages)")
    return BuildResult(artifacts=artifacts, manifest_path=manifest_path, manifest=manifest, timings=timings)


@dataclass(frozen=True)
class SuiteSource:
    suite: str
    url: str  # the mirror it comes from
    release: archive.ReleaseInfo


def _fetch_suites(fetcher: archive.Fetcher, recipe: Recipe, mirror: str, opts: BuildOptions) -> list[SuiteSource]:
    """The verified Release of the recipe's suite and of each extra suite, main suite first."""
    out = []
    for suite in (recipe.suite, *recipe.bootstrap.extra_suites):
        url = mirror
        if suite.endswith("-security"):
            url = resolve_mirror(opts.security_mirror, recipe.bootstrap.security_mirror, security=True)
        release = archive.fetch_release(fetcher, url, suite, recipe.bootstrap.keyring)
        say(f"    {suite}: Release of {release.date}, InRelease sha256 {release.inrelease_sha256[:16]}…")
        out.append(SuiteSource(suite, url, release))
    return out


def default_arch(recipe: Recipe) -> str:
    """The host's architecture if the recipe lists it, else the recipe's first (`build` and `check --resolve`)."""
    from tmplbuild.run import host_arch

    native = host_arch()
    return native if native in recipe.architectures else recipe.architectures[0]


def fetch_indices(fetcher: archive.Fetcher, recipe: Recipe, suites: list[SuiteSource], arch: str,
                  cache_dir: Path) -> dict[tuple[str, str], Path]:
    """Each suite's and component's Packages index for `arch`, checked against its signed hash (cached)."""
    return {(x.suite, c): archive.fetch_packages(fetcher, x.url, x.release, x.suite, c, arch, cache_dir)
            for x in suites for c in recipe.bootstrap.components}


def plan_packages(recipe: Recipe, suites: list[SuiteSource], indices: dict[tuple[str, str], Path],
                  mirror: str) -> BootstrapPlan:
    """The bootstrap plan, by debootstrap's rules, over the newest of every suite's packages."""
    urls = {x.suite: x.url for x in suites}
    packages = archive.merge_newest([
        archive.parse_packages(path.read_bytes(), base_url=urls[suite], origin=f"{suite}/{component}")
        for (suite, component), path in indices.items()])
    return make_plan(packages, codename=suites[0].release.codename or recipe.suite,
                     variant=recipe.bootstrap.variant, include=recipe.include, exclude=recipe.exclude,
                     https_mirror=mirror.startswith("https://"))


def _resolve(fetcher: archive.Fetcher, recipe: Recipe, opts: BuildOptions, suites: list[SuiteSource],
             mirror: str) -> tuple[dict[tuple[str, str], Path], BootstrapPlan, bytes]:
    """Index files, the bootstrap plan, and the trimmed index debootstrap gets. The plan is cached under
    everything it depends on, so a warm build parses no index at all."""
    indices = fetch_indices(fetcher, recipe, suites, opts.arch, opts.cache_dir)
    key_src = json.dumps([[x.release.inrelease_sha256 for x in suites], opts.arch, recipe.bootstrap.variant,
                          list(recipe.bootstrap.components), list(recipe.include), list(recipe.exclude),
                          mirror.startswith("https://"), suites[0].release.codename], sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()
    plan_file = opts.cache_dir / "plans" / f"{key}.json"
    trimmed_file = plan_file.with_suffix(".Packages")
    if plan_file.exists() and trimmed_file.exists():
        data = json.loads(plan_file.read_text())
        plan = BootstrapPlan(required=tuple(data["required"]), base=tuple(data["base"]),
                             debs=tuple(archive.Package(**{**d, "depends": tuple(d["depends"])})
                                        for d in data["debs"]))
        say(f"    cached plan {key[:16]}…")
        return indices, plan, trimmed_file.read_bytes()
    plan = plan_packages(recipe, suites, indices, mirror)
    missing = missing_packages(plan)
    if missing:
        raise UsageError("packages", f"not in {', '.join(x.suite for x in suites)} "
                                     f"{'/'.join(recipe.bootstrap.components)} for {opts.arch}: {', '.join(missing)}")
    # debootstrap reads one index per component of the main suite: give it the chosen stanza of every planned
    # package, whichever suite it came from.
    trimmed = b"".join(
        archive.select_stanzas(path.read_bytes(), {p.name for p in plan.debs if p.origin == f"{suite}/{component}"})
        for (suite, component), path in indices.items())
    atomic_write(trimmed_file, trimmed)
    _write_json(plan_file, {"required": plan.required, "base": plan.base,
                            "debs": [{**d.__dict__, "depends": list(d.depends)} for d in plan.debs]})
    upgraded = sum(1 for p in plan.debs if not p.origin.startswith(f"{recipe.suite}/"))
    say(f"    {len(plan.required)} required + {len(plan.base)} base packages, {upgraded} from "
        f"{', '.join(x.suite for x in suites[1:]) or 'no extra suite'}")
    return indices, plan, trimmed


def _bootstrap(root: Path, work: Path, mirror: str, recipe: Recipe, arch: str, suites: list[SuiteSource],
               indices: dict[tuple[str, str], Path], plan: BootstrapPlan, trimmed: bytes, debs: list[Path],
               log: Path) -> None:
    """Lay the verified lists and .debs where debootstrap expects them, then let debootstrap install the
    resolved plan (its --unpack-tarball mode: no second resolution, no second download)."""
    lists = root / "var/lib/apt/lists"
    archives = root / "var/cache/apt/archives"
    lists.mkdir(parents=True)
    (archives / "partial").mkdir(parents=True)
    for x in suites:
        (lists / lists_name(x.url, f"dists/{x.suite}/InRelease")).write_bytes(x.release.raw)
    main_lists = [lists / lists_name(mirror, f"dists/{recipe.suite}/{c}/binary-{arch}/Packages")
                  for c in recipe.bootstrap.components]
    main_lists[0].write_bytes(trimmed)
    for extra in main_lists[1:]:
        extra.write_bytes(b"")  # present, so debootstrap still lists the component in sources.list
    if foreign.is_foreign(arch) and os.environ.get("TMPLBUILD_PLAIN_DEBS", "1") != "0":
        # The chroot's dpkg-deb would decompress every package as emulated code: hand it the same members,
        # decompressed here (plaindeb's docstring; TMPLBUILD_PLAIN_DEBS=0 hands over the archive's files as they are).
        plaindeb.decompress_all((deb, archives / pkg.deb_name) for pkg, deb in zip(plan.debs, debs))
    else:
        for pkg, deb in zip(plan.debs, debs):
            shutil.copyfile(deb, archives / pkg.deb_name)
    tarball = work / "plan.tar"
    with tarfile.open(tarball, "w") as tar:
        for name, text in (("required", " ".join(plan.required) + "\n"), ("base", " ".join(plan.base) + "\n"),
                           ("debpaths", plan.debpaths())):
            data = text.encode()
            info = tarfile.TarInfo(f"debootstrap/{name}")
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    argv = debootstrap_argv(suite=recipe.suite, target=root, mirror=mirror, arch=arch,
                            variant=recipe.bootstrap.variant, components=recipe.bootstrap.components,
                            plan_tarball=tarball)
    try:
        run(argv, check="debootstrap", log=log)
        # debootstrap copies the build host's /etc/hostname (and resolv.conf, which the chroot mounts replace
        # while scripts run): a template keeps the name its container manager gives, and has a sane hosts file
        # unless the recipe brings its own.
        (root / "etc/hostname").unlink(missing_ok=True)
        if not (root / "etc/hosts").exists():
            (root / "etc/hosts").write_text(normalize.DEFAULT_HOSTS)
        # Scripts may call apt-get without an update: give them every suite's full, verified index, and the
        # template the sources of every suite it was built from, so it keeps getting those updates.
        for (suite, component), index in indices.items():
            url = next(x.url for x in suites if x.suite == suite)
            shutil.copyfile(index, lists / lists_name(url, f"dists/{suite}/{component}/binary-{arch}/Packages"))
        with open(root / "etc/apt/sources.list", "a") as f:
            for x in suites[1:]:
                f.write(f"deb {x.url} {x.suite} {' '.join(recipe.bootstrap.components)}\n")
    finally:
        # debootstrap mounts /proc and /sys itself and may leave them on failure.
        for point in chroot.mounts_under(root):
            chroot.umount(point)


def _customise(root: Path, recipe: Recipe, env: dict[str, str], log: Path) -> None:
    """Stage scripts, extra repositories with their packages, and files, in that documented order:
    post-bootstrap scripts, repositories + packages, files, post-install scripts, pre-pack scripts."""
    index = 0
    with chroot.chroot_mounts(root):
        for script in recipe.scripts_for(Stage.POST_BOOTSTRAP):
            index += 1
            chroot.run_script(root, script, index, {**env, "TMPLBUILD_STAGE": script.stage.value}, log)
        if recipe.repositories:
            _add_repositories(root, recipe, env, log)
        for entry in recipe.files:
            dest = root / entry.dest.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(entry.content)
            dest.chmod(entry.mode)
        for stage in (Stage.POST_INSTALL, Stage.PRE_PACK):
            for script in recipe.scripts_for(stage):
                index += 1
                chroot.run_script(root, script, index, {**env, "TMPLBUILD_STAGE": stage.value}, log)


def _add_repositories(root: Path, recipe: Recipe, env: dict[str, str], log: Path) -> None:
    """Each extra repository is trusted through its own key only (deb822 Signed-By), never globally."""
    keyrings = root / "etc/apt/keyrings"
    keyrings.mkdir(parents=True, exist_ok=True)
    wanted: list[str] = []
    for repo in recipe.repositories:
        key = keyrings / f"tmplbuild-{repo.name}.{'asc' if repo.key_armored else 'gpg'}"
        key.write_bytes(repo.key)
        key.chmod(0o644)
        (root / f"etc/apt/sources.list.d/{repo.name}.sources").write_text(
            "Types: deb\n"
            f"URIs: {' '.join(repo.uris)}\n"
            f"Suites: {' '.join(repo.suites)}\n"
            f"Components: {' '.join(repo.components)}\n"
            f"Signed-By: /{key.relative_to(root)}\n"
        )
        wanted.extend(repo.packages)
    mark = log.stat().st_size if log.exists() else 0
    try:
        chroot.chroot_run(root, ["apt-get", "update", "-q"], "apt-get update", env, log)
    except BuildError as exc:
        # apt refuses an unsigned or wrongly signed repository; that is an authenticity failure, not a typo.
        with open(log, "rb") as f:
            f.seek(mark)
            output = f.read().decode(errors="replace")
        if any(s in output for s in APT_SIGNATURE_ERRORS):
            detail = next(ln.strip() for ln in output.splitlines() if any(s in ln for s in APT_SIGNATURE_ERRORS))
            raise AuthenticityError("repository signature", detail[:300]) from None
        raise exc
    if wanted:
        chroot.chroot_run(root, ["apt-get", "install", "-y", "-q", "--no-install-recommends", "--", *wanted],
                          "apt-get install", env, log)
    chroot.chroot_run(root, ["apt-get", "clean"], "apt-get clean", env, log)


class _plain_dir:
    """No tmpfs (a host short of memory): the build dir on disk, same interface."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path

    def __exit__(self, *exc) -> None:
        for point in chroot.mounts_under(self.path):
            chroot.umount(point)


def _documents(manifest: Manifest, paths: list[Path], suites: list[SuiteSource],
               formats: list[str]) -> list[pack.Artifact]:
    """The SBOMs and the provenance, staged next to the template's files (tmplbuild.sbom.documents)."""
    by_format = dict(zip(DOCUMENT_FORMATS, paths))
    out = [_stage_bytes(by_format[SPDX_FORMAT], SPDX_FORMAT, documents.spdx(manifest)),
           _stage_bytes(by_format[CYCLONEDX_FORMAT], CYCLONEDX_FORMAT, documents.cyclonedx(manifest))]
    subjects = [(a.file, a.sha256) for a in manifest.artifacts] + [(p.name, a.sha256) for p, a in zip(paths, out)]
    releases = [documents.Release(f"{x.url}/dists/{x.suite}/InRelease", x.release.inrelease_sha256) for x in suites]
    out.append(_stage_bytes(by_format[PROVENANCE_FORMAT], PROVENANCE_FORMAT,
                            documents.provenance(manifest, subjects, releases, formats)))
    return out


def _stage_bytes(final: Path, fmt: str, data: bytes) -> pack.Artifact:
    staged = final.with_name(f".{final.name}.part")
    try:
        with open(staged, "wb") as f:
            f.write(data)
    except OSError:
        staged.unlink(missing_ok=True)
        raise
    return pack.Artifact(staged, fmt, len(data), hashlib.sha256(data).hexdigest(), hashlib.sha512(data).hexdigest())


def _keep_log(log: Path, dest: Path) -> None:
    try:
        if log.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(log, dest)
            say(f"    build log kept at {dest}")
    except OSError:
        pass


def _write_json(path: Path, data: object) -> None:
    atomic_write(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
