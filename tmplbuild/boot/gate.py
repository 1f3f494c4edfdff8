"""Nothing untested is published: `tmplbuild publish` and `tmplbuild rebuild` boot a template in every container
manager this host has (`tmplbuild test --manager all`) before it goes into the index, and record the result in
its manifest, which the index signs through its sha256. `--skip-test` publishes without, loudly, and says so in
the manifest too."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tmplbuild import __version__
from tmplbuild.errors import AuthenticityError, EnvironmentUnfitError, TemplateTestError, UsageError
from tmplbuild.files import hash_file
from tmplbuild.manifest import Manifest
from tmplbuild.repo.index import ROOTFS_FORMATS

if TYPE_CHECKING:
    from tmplbuild.oci.image import OciImage


def primary_file(manifest: Manifest, manifest_path: Path) -> tuple[Path, str]:
    """The template file a test boots (the first root-filesystem format the manifest lists) and its sha256."""
    for a in manifest.artifacts:
        if a.format in ROOTFS_FORMATS:
            return manifest_path.with_name(a.file), a.sha256
    raise EnvironmentUnfitError("template test", f"{manifest_path.name}: lists no .tar.zst or .tar.xz to boot")


def already_tested(manifest: Manifest, sha256: str, image: str | None = None) -> bool:
    """A passing record of this tar; with `image` (the OCI image's diff_id), one that also checked that image."""
    record = manifest.test or {}
    return record.get("result") == "pass" and record.get("sha256") == sha256 and record.get("image") == image


def test_record(manifest: Manifest, manifest_path: Path, *, skip: bool, apt_mirror: str | None = "named") -> dict:
    """The manifest's `test` record for publishing: an existing passing record of the same file, a new run of
    every manager available here, or, with skip, a record saying it was not tested. Raises TemplateTestError
    (exit 8: a check failed; nothing may be published) and EnvironmentUnfitError (exit 2: no manager could boot
    it here; --skip-test is the explicit way out)."""
    from tmplbuild.boot.runner import ALL, TestOptions, render, test_artifact

    from tmplbuild.oci import record

    path, sha256 = primary_file(manifest, manifest_path)
    what = " ".join(manifest.key)
    try:
        image = record.of(manifest)
    except ValueError as exc:
        raise AuthenticityError("oci image", f"{manifest_path.name}: {exc}") from None
    covered = {"image": image.image.diff_id} if image is not None else {}
    if already_tested(manifest, sha256, covered.get("image")):
        return dict(manifest.test or {})  # its run checked the image too: not again (rebuild, then publish)
    if image is not None:
        image_is_the_tar(manifest_path.with_name(image.file), image.image, path)
    if skip:
        print(f"tmplbuild: --skip-test: {what} is published UNTESTED: no container booted it; the manifest "
              "says so", file=sys.stderr, flush=True)
        return {"result": "skipped", "reason": "--skip-test", "file": path.name, "sha256": sha256,
                "date": _now(), "tmplbuild": __version__}
    try:
        _, actual, _ = hash_file(path)
    except OSError as exc:
        raise UsageError("artifact", f"{path}: {exc.strerror}") from None
    if actual != sha256:
        raise AuthenticityError("artifact hash", f"{path}: sha256 {actual[:16]}…, its manifest says {sha256[:16]}…")
    report = test_artifact(path, TestOptions(managers=list(ALL), explicit=False, apt_mirror=apt_mirror))
    print(render(report), file=sys.stderr, flush=True)  # stdout is the caller's (a rebuild summary, JSON)
    managers = [{"manager": m.manager, "version": m.version, "status": m.status,
                 **({"reason": m.reason} if m.reason else {}),
                 "checks": {c.name: c.status for c in m.checks}} for m in report.managers]
    if report.failed:
        failed = "; ".join(f"{m.manager}: {', '.join(c.name for c in m.checks if c.status == 'fail')}"
                           for m in report.failed)
        raise TemplateTestError("template test", f"{path.name} failed {failed}; not published")
    if report.status != "pass":
        raise EnvironmentUnfitError("template test", f"{what}: no container manager can boot it here ("
                                    + "; ".join(f"{m.manager}: {m.reason}" for m in report.managers)
                                    + "); install lxc and systemd-container, or pass --skip-test")
    return {"result": "pass", "file": path.name, "sha256": sha256, **covered, "date": _now(),
            "tmplbuild": __version__, "seconds": round(report.seconds, 1), "managers": managers}


def image_is_the_tar(archive: Path, image: OciImage, tar: Path) -> None:
    """The OCI image is covered by the boot of the tarball: `archive` is the image its manifest records (every
    digest), and its one layer is that very tar (diff_id = the sha256 of the uncompressed tar that boots). Raises
    AuthenticityError ("oci image")."""
    import hashlib

    from tmplbuild.oci.image import open_tar, verify_archive

    verify_archive(archive, image)
    h = hashlib.sha256()
    with open(tar, "rb") as f, open_tar(f, "tar.zst" if tar.name.endswith(".tar.zst") else "tar.xz") as reader:
        while chunk := reader.read(1 << 20):
            h.update(chunk)
    if f"sha256:{h.hexdigest()}" != image.diff_id:
        raise AuthenticityError("oci image", f"{archive.name}: its layer (diff_id {image.diff_id}) is not the tar of "
                                             f"{tar.name} (sha256:{h.hexdigest()}), which the test boots")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
