"""A real Distribution registry (`docker-registry serve`, Debian's package) on 127.0.0.1 for the OCI tests, and
small helpers: throwaway signing keys, tiny oci-archives, htpasswd entries.

`registry` is a module-scoped fixture (import it into a test module: `from tests.oci_registry import registry`);
`Registry.start(base, ...)` starts further ones (with htpasswd auth). Each registry runs in its own session and is
always stopped (SIGTERM, wait, SIGKILL of the group): none outlives the test that started it."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import time
import warnings
from pathlib import Path

import pytest
import requests

from tests.conftest import gpg

REGISTRY_BIN = "docker-registry"
EPOCH = 1_780_000_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Registry:
    """`docker-registry serve CONFIG`: filesystem storage under `base`, plain HTTP on 127.0.0.1:<free port>,
    deletes enabled, optionally htpasswd auth. `.host` is "127.0.0.1:PORT", `.url` "http://127.0.0.1:PORT"."""

    def __init__(self, base: Path, htpasswd: Path | None = None) -> None:
        base.mkdir(parents=True, exist_ok=True)
        self.base = base
        for _ in range(3):  # a free port can be taken between the probe and the bind: try again
            self.port = free_port()
            self.host = f"127.0.0.1:{self.port}"
            self.url = f"http://{self.host}"
            config = base / "config.yml"
            auth = (f"auth:\n  htpasswd:\n    realm: tmplbuild-test\n    path: {htpasswd}\n" if htpasswd else "")
            config.write_text(f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
                              f"    rootdirectory: {base / 'data'}\n  delete:\n    enabled: true\n"
                              f"http:\n  addr: {self.host}\n  secret: tmplbuild-test-secret\n{auth}")
            self.log = base / "registry.log"
            with open(self.log, "wb") as log:
                self.proc = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdout=log, stderr=log,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
            if self._wait():
                return
            self.stop()
        raise AssertionError(f"docker-registry did not start: {self.log.read_text()[-2000:]}")

    def _wait(self) -> bool:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                status = requests.get(self.url + "/v2/", timeout=2).status_code
                if status in (200, 401):  # 401: up, and asking for credentials
                    return True
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    if not shutil.which(REGISTRY_BIN) or not shutil.which("skopeo"):
        pytest.skip("needs docker-registry and skopeo (apt-get install docker-registry skopeo)")
    reg = Registry(tmp_path_factory.mktemp("registry"))
    try:
        yield reg
    finally:
        reg.stop()


def htpasswd_entry(user: str, password: str) -> str | None:
    """A bcrypt htpasswd line (the only hash Distribution's htpasswd auth takes): `htpasswd -Bbn` (apache2-utils),
    else libcrypt's bcrypt through Python's crypt module; None when neither is available."""
    if shutil.which("htpasswd"):
        out = subprocess.run(["htpasswd", "-Bbn", user, password], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt  # removed in Python 3.13
        if crypt.METHOD_BLOWFISH in crypt.methods:
            return f"{user}:{crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH))}"
    except ImportError:
        pass
    return None


def make_key(home: Path, name: str = "oci", *, caps: str = "sign") -> str:
    """A throwaway ed25519 key (as conftest's throwaway_key makes it) in its own GNUPGHOME; its fingerprint.
    caps="cert" makes a certify-only primary key with a signing subkey."""
    home.mkdir(mode=0o700, parents=True)
    gpg(home, "--quick-gen-key", f"{name} <{name}@example.invalid>", "ed25519", caps, "1d")
    fpr = [ln.split(":")[9] for ln in gpg(home, "--with-colons", "--list-keys").stdout.decode().splitlines()
           if ln.startswith("fpr:")][0]
    if caps == "cert":
        gpg(home, "--quick-add-key", fpr, "ed25519", "sign", "1d")
    return fpr


def kill_agents(home: Path) -> None:
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)


def template_tar(content: bytes) -> bytes:
    """A tiny template tar (etc/, etc/motd)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        d = tarfile.TarInfo("etc")
        d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, EPOCH
        tar.addfile(d)
        info = tarfile.TarInfo("etc/motd")
        info.size, info.mtime, info.mode = len(content), EPOCH, 0o644
        tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def make_archive(path: Path, content: bytes = b"hello\n") -> str:
    """A tiny single-layer OCI image as an oci-archive at `path`, made by tmplbuild's own exporter
    (tmplbuild.oci.image.export), deterministic for a given `content`. Returns its manifest digest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        from tmplbuild.oci.image import ImageMeta, export
    except ImportError:  # the exporter being reworked: a hand-written layout tests skopeo and signing as well
        return _hand_made_archive(path, content)
    meta = ImageMeta("demo", "12-1", "amd64", "test image", "sha256:" + "0" * 64, EPOCH)
    return export(io.BytesIO(template_tar(content)), path, meta).manifest_digest


def _blob(members: dict[str, bytes], data: bytes) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    members[f"blobs/sha256/{digest}"] = data
    return {"digest": f"sha256:{digest}", "size": len(data)}


def _hand_made_archive(path: Path, content: bytes) -> str:
    """oci-layout, index.json and blobs written by hand: one gzip layer, an OCI config and manifest."""
    raw = template_tar(content)
    members: dict[str, bytes] = {}
    layer = _blob(members, gzip.compress(raw, mtime=0))
    config = _blob(members, json.dumps({
        "architecture": "amd64", "os": "linux", "config": {"Cmd": ["/sbin/init"]},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(raw).hexdigest()]}},
        sort_keys=True, separators=(",", ":")).encode())
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **layer}]},
        sort_keys=True, separators=(",", ":")).encode()
    ref = _blob(members, manifest)
    index = json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", **ref}]}, separators=(",", ":")).encode()
    members = {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}', "index.json": index, **members}
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), EPOCH, 0o644
            tar.addfile(info, io.BytesIO(data))
    return str(ref["digest"])
