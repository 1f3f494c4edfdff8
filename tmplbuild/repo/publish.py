"""`tmplbuild publish`: add built templates to a local repository directory.

Order, under the repository lock: the repository's trust (tmplbuild.repo.chain: its root chain, or keys/) and the
signer's place in it; verify the current index as a publisher reads it (chain's base verifier); copy each file
to a hidden temporary name while hashing it (it must match its build manifest); sign it; verify every new
signature with the verifier clients use (the newest root's online keys); only then rename the files into place,
then the directory's SHA256SUMS pair, then the new index (version + 1) last. A crash at any point leaves the
previous index and everything it lists intact. What was moved in but never listed (a crash, a full disk) is
removed again: at once when the publish fails with an error, else by the next publish, which first converges the
repository on its signed index (tmplbuild.repo.converge), as the server's start and `repo verify --repair` do."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from collections.abc import Callable
from pathlib import Path

from tmplbuild import zst
from tmplbuild.errors import AuthenticityError, UsageError
from tmplbuild.files import fsync_path
from tmplbuild.manifest import Manifest, ManifestError
from tmplbuild.manifest import parse as parse_manifest
from tmplbuild.oci import publisher as oci_publisher
from tmplbuild.oci import record
from tmplbuild.oci.publisher import Destination as OciDestination
from tmplbuild.repo import converge
from tmplbuild.repo import deltas
from tmplbuild.repo import lookaside
from tmplbuild.repo import index as idx
from tmplbuild.repo import sums
from tmplbuild.repo import store
from tmplbuild.sign import Signer

CHUNK = 1 << 20
FORMATS = idx.FORMATS


@dataclass(frozen=True)
class Artifact:
    """A built template as the builder left it: its manifest and the files the manifest lists."""

    manifest_path: Path
    manifest_bytes: bytes
    manifest: Manifest
    files: tuple[tuple[str, Path, int, str, str], ...]  # (format, path, size, sha256, sha512)

    @property
    def key(self) -> tuple[str, str, str]:
        return self.manifest.key


def load_artifact(path: Path) -> Artifact:
    """A manifest path, or a template file next to its `<stem>.manifest.json`. Raises UsageError."""
    stem = path.name
    for suffix in sorted((".manifest.json", *(f".{f}" for f in FORMATS)), key=len, reverse=True):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    manifest_path = path.with_name(f"{stem}.manifest.json")
    try:
        data = manifest_path.read_bytes()
        manifest = parse_manifest(data)
        name, version, arch = manifest.key
        files = tuple((a.format, manifest_path.with_name(a.file), a.size, a.sha256, a.sha512)
                      for a in manifest.artifacts)
    except FileNotFoundError:
        raise UsageError("artifact", f"{manifest_path}: no such manifest (publish takes what `tmplbuild build` "
                                     f"wrote: the .tar.zst or its .manifest.json)") from None
    except OSError as exc:
        raise UsageError("artifact", f"{manifest_path}: {exc.strerror}") from None
    except ManifestError as exc:
        raise UsageError("artifact", f"{manifest_path}: not a tmplbuild manifest ({exc})") from None
    if not (idx.NAME.match(name) and idx.VERSION.match(version) and re.fullmatch(r"[a-z0-9]+", arch)):
        raise UsageError("artifact", f"{manifest_path}: malformed name, version or arch")
    for fmt, p, *_ in files:
        if fmt not in FORMATS or p.name != f"{name}_{version}_{arch}.{fmt}":
            raise UsageError("artifact", f"{manifest_path}: unexpected file {p.name}")
    try:
        image = record.of(manifest)
    except ValueError as exc:
        raise UsageError("artifact", f"{manifest_path}: {exc}") from None
    if image is not None and (idx.OCI_FORMAT, image.file) not in {(fmt, p.name) for fmt, p, *_ in files}:
        raise UsageError("artifact", f"{manifest_path}: its image {image.file} is not among the files it lists")
    return Artifact(manifest_path, data, manifest, files)


@dataclass
class Published:
    index: idx.Index
    added: list[idx.Entry]
    unchanged: list[tuple[str, str, str]]
    cleaned: list[str] = field(default_factory=list)  # leftovers of an interrupted publish, removed first


def publish(root: Path, paths: list[Path], signer: Signer, expires_in: int,
            oci: OciDestination | None = None, delta_count: int | None = None) -> Published:
    """Each new tar.zst also gets deltas from the last `delta_count` earlier versions of its name and arch
    (tmplbuild.repo.deltas; 0: none; None: DEFAULT_COUNT). With `oci`, each new template's OCI image is also pushed
    to that registry and signed (tmplbuild.oci.publisher) after the trust checks and before its files and the index
    are written; its lookaside signatures go under sigstore/. Raises UsageError, AuthenticityError (current index,
    artifact hashes, a new signature that does not verify; "signer": a key the newest root does not name as online;
    "index signer": the index in place was signed by a key the newest root dropped, which `repo resign --carry-over`
    must re-sign first; "oci push": the registry stored another digest), FreshnessError ("root expired"),
    TransportError (the registry), LocalIOError (lock, disk). The trust checks come before anything is written or
    pushed. On any of these, nothing it wrote stays behind: no file, no empty directory, the previous SHA256SUMS
    pairs."""
    from tmplbuild.repo.manage import _write_sums, refuse_carried_over, writer_trust

    artifacts = [load_artifact(p) for p in paths]
    delta_count = deltas.DEFAULT_COUNT if delta_count is None else delta_count
    if oci is not None:
        for art in artifacts:
            oci_publisher.image_of(art.manifest, art.manifest_path)  # every one has an image, before any push
    with store.locked(root) as recovered:
        trust = writer_trust(root, signer, legacy_key_check=True)
        with trust.base_verifier() as base, trust.index_verifier() as verifier:
            current, _ = store.load_index(root, base)
            refuse_carried_over(root, trust, base, "publish")

            def write_sums(directory: Path, entries: list[idx.Entry]) -> None:
                _write_sums(directory, entries, signer, verifier)

            cleaned = recovered + converge.converge(root, current, write_sums=write_sums)
            try:
                added, unchanged = stage_additions(
                    current, artifacts, lambda art, neighbours: _add(
                        root, art, signer, verifier, neighbours, push_image(art, oci, signer),
                        deltas.bases(current, *art.key, art.manifest.created, delta_count),
                        lambda ref: root / ref.path))
                if not added:  # every file already published as it is: a no-op, the index stays as signed
                    return Published(current, added, unchanged, cleaned)
                new = current.successor(tuple(current.templates) + tuple(added), expires_in)
                data = new.to_bytes()
                sig = signer.sign(data, armored=True)
                verifier.verify(data, sig)
                _fault("before-index")
                store.write_index(root, data, sig)
            except Exception:
                converge.roll_back(root, base)
                raise
            converge.settle(root, new)  # the SHA256SUMS backups, now that the new index lists the new pairs
            return Published(new, added, unchanged, cleaned)


def stage_additions(current: idx.Index, artifacts: list[Artifact],
                    add: Callable[[Artifact, list[idx.Entry]], idx.Entry]) -> tuple[list[idx.Entry], list]:
    """The entries to add to `current`: an artifact already listed with the same content is skipped
    (unchanged), one listed with other content is refused (a version is immutable once published). `add`
    writes an artifact's files given the entries that share its version directory (for SHA256SUMS). Raises
    UsageError."""
    listed = {e.key: e for e in current.templates}
    added: list[idx.Entry] = []
    unchanged = []
    for art in artifacts:
        old = listed.get(art.key)
        if old is not None:
            if [(f.sha256, f.size) for f in old.template_files] == [(f[3], f[2]) for f in art.files]:
                unchanged.append(art.key)
                continue
            raise UsageError("publish", f"{'/'.join(art.key)} is already published with other content; "
                                        f"build it with a new version")
        neighbours = [e for e in (*current.templates, *added) if e.directory == _directory(art)]
        added.append(add(art, neighbours))
    return added, unchanged


def _directory(art: Artifact) -> str:
    return f"templates/{art.manifest.name}/{art.manifest.version}"


def push_image(art: Artifact, oci: OciDestination | None, signer: Signer) -> Pushed | None:
    """With `oci`: push the artifact's image and sign it (tmplbuild.oci.publisher.push); None without."""
    return None if oci is None else oci_publisher.push(art.manifest, art.manifest_path, oci, signer)


Pushed = tuple[Manifest, list[tuple[record.Signature, bytes]]]  # the manifest with its registry record, the lookaside files


def _add(root: Path, art: Artifact, signer: Signer, verifier, neighbours: list[idx.Entry],
         pushed: Pushed | None = None, bases: list[idx.Entry] | None = None,
         base_file: deltas.BaseFile | None = None) -> idx.Entry:
    """Write one template's files into its version directory and return its index entry. `pushed`: its image is
    in a registry; the manifest written is the one with the registry record, and the lookaside signature files
    go under sigstore/. `bases`: published entries to write deltas from to its tar.zst (their files found by
    `base_file`), listed after its files."""
    lookaside_files: list[tuple[record.Signature, bytes]] = []
    if pushed is not None:
        manifest, lookaside_files = pushed
        art = dataclasses.replace(art, manifest=manifest, manifest_bytes=manifest.to_bytes())
    name, version, arch = art.key
    rel_dir = _directory(art)
    directory = root / rel_dir
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise store.io_error("mkdir", directory, exc) from None
    manifest_name = f"{name}_{version}_{arch}.manifest.json"
    staged: list[tuple[Path, Path]] = []  # (temporary, final)
    pool = ThreadPoolExecutor(max_workers=2)
    try:
        # gpg signs each source file while it is copied and hashed: two cores, one pass each. The signature is
        # then verified against the copy, so a source that changed in between cannot slip through.
        sigs = {src: pool.submit(signer.sign_file, src, armored=True) for _, src, *_ in art.files}
        refs = []
        for fmt, src, size, sha256, sha512 in art.files:
            tmp = directory / f".{src.name}.part"
            staged.append((tmp, directory / src.name))
            got = _copy_hashing(src, tmp)
            # Size and sha256 equal to the manifest's prove the content is what the builder hashed, so the
            # manifest's sha512 is taken as is (hashing twice more would be half of publish's own time).
            # `repo verify` and every client still check both.
            if got != (size, sha256):
                raise AuthenticityError("artifact hash", f"{src}: size/sha256 {got[0]}/{got[1][:16]}… differ "
                                                         f"from its manifest {size}/{sha256[:16]}…")
            refs.append(idx.FileRef(f"{rel_dir}/{src.name}", size, sha256, sha512, fmt))
        made: list[deltas.Made] = []
        zstd_file = next(((src, sha256) for fmt, src, _, sha256, _ in art.files if fmt == "tar.zst"), None)
        if bases and base_file is not None and zstd_file is not None:
            made = deltas.make(base_file, directory, art.key, zstd_file[0], zstd_file[1],
                               int(art.manifest.build.get("zstd_level", zst.LEVEL)), bases)
            for m in made:
                staged.append((m.path, directory / Path(m.ref.path).name))
            # Signed like the template's files (a detached .asc each), in the same pool.
            sigs.update({m.path: pool.submit(signer.sign_file, m.path, armored=True) for m in made})
        mtmp = directory / f".{manifest_name}.part"
        staged.append((mtmp, directory / manifest_name))
        store.write_durable(mtmp, art.manifest_bytes)
        manifest_ref = idx.FileRef(f"{rel_dir}/{manifest_name}", len(art.manifest_bytes),
                                   hashlib.sha256(art.manifest_bytes).hexdigest())
        signatures = [sigs[src].result() for _, src, *_ in art.files] + [sigs[m.path].result() for m in made] + \
            [signer.sign(art.manifest_bytes, armored=True)]
        targets = list(staged)
        # A detached .asc per file (gpg --verify by hand), each verified before anything is renamed.
        list(pool.map(lambda ts: verifier.verify_file(ts[0][0], ts[1]), zip(targets, signatures)))
        for (tmp, final), sig in zip(targets, signatures):
            asc_tmp = directory / f".{final.name}.asc.part"
            store.write_durable(asc_tmp, sig)
            staged.append((asc_tmp, final.with_name(final.name + ".asc")))
        # SHA256SUMS covers every template file and manifest of this version directory, all arches.
        listed = sums.expected(neighbours)
        listed.update({Path(r.path).name: r.sha256 for r in (*refs, *(m.ref for m in made), manifest_ref)})
        text = sums.render(listed)
        sums_sig = signer.sign(text, armored=False)
        for fname, content in (("SHA256SUMS", text), ("SHA256SUMS.gpg", sums_sig)):
            tmp = directory / f".{fname}.part"
            store.write_durable(tmp, content)
            staged.append((tmp, directory / fname))
        # One signature, as gpgv and systemd-pull read it: verify_file over the text as staged.
        verifier.verify_file(directory / ".SHA256SUMS.part", sums_sig)
        for sig, data in lookaside_files:  # the image's simple signatures, where skopeo looks for them
            staged.append((lookaside.stage(root, sig, data, verifier), root / sig.path))
        _fault("before-files")
        try:
            for tmp, _ in staged:
                fsync_path(tmp)  # deferred from the copy: the kernel wrote back while gpg was signing
        except OSError as exc:
            raise store.io_error("write", tmp, exc) from None
        # The pair the current index relies on is kept (hard links) until the new index is in: if that never
        # happens, converge.converge puts it back.
        converge.backup_sums(directory)
        # Template files, manifests and their signatures first; then SHA256SUMS.gpg before SHA256SUMS, so a
        # reader never pairs new sums with an old signature that would pass.
        order = sorted(staged, key=lambda s: (s[1].name == "SHA256SUMS", s[1].name == "SHA256SUMS.gpg"))
        try:
            for tmp, final in order:
                os.replace(tmp, final)
            for d in {directory, *(final.parent for _, final in staged)}:
                store.fsync_dir(d)
        except OSError as exc:
            raise store.io_error("write", directory, exc) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    return idx.Entry(
        name=name, version=version, arch=arch, distribution=art.manifest.distribution,
        release=art.manifest.release, variant=art.manifest.variant, description=art.manifest.description,
        created=art.manifest.created, input_hash=art.manifest.input_hash,
        files=(*refs, *(m.ref for m in made)), manifest=manifest_ref)


def _copy_hashing(src: Path, dest: Path) -> tuple[int, str]:
    """Put src's content at dest and return (size, sha256) of what dest holds. On the same filesystem dest is a
    hard link: the builder only ever replaces its outputs (a new inode), so the published bytes cannot change
    under the repository, and a 60 MB write is saved. Otherwise a copy. Not fsynced here: _add does that later,
    after signing, so the write-back overlaps gpg's work."""
    dest.unlink(missing_ok=True)
    try:
        os.link(src, dest)
        linked = True
    except FileNotFoundError:
        raise UsageError("artifact", f"{src}: missing (listed in its manifest)") from None
    except OSError:
        linked = False
    h256, size = hashlib.sha256(), 0
    try:
        with open(dest if linked else src, "rb") as fin, (open(os.devnull, "wb") if linked else open(dest, "wb")) as fout:
            while chunk := fin.read(CHUNK):
                h256.update(chunk)
                if not linked:
                    fout.write(chunk)
                size += len(chunk)
    except OSError as exc:
        raise store.io_error("write", dest, exc) from None
    return size, h256.hexdigest()


def _fault(point: str) -> None:
    """A deliberate crash point for the crash-safety tests (TMPLBUILD_FAULT=<point>): the process dies as a
    SIGKILL would leave it, with no clean-up."""
    if os.environ.get("TMPLBUILD_FAULT") == point:
        os._exit(137)
