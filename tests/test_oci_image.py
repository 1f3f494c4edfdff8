"""The template as an OCI image: deterministic, read by Proxmox VE's rule, umoci and skopeo as the same tree as the
tar, verified strictly, and refused when its tar holds what an image must not."""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import random
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import pytest
import zstandard

from tmplbuild import __version__
from tmplbuild.builder.pack import write_tar
from tmplbuild.errors import AuthenticityError, LocalIOError, UnsafeContentError, UsageError
from tmplbuild.oci.image import (
    FORMAT, MEDIA_CONFIG, MEDIA_INDEX, MEDIA_LAYER, MEDIA_MANIFEST, ImageMeta, LayerSink, OciImage, export,
    read_archive, verify_archive,
)

ROOT = Path(__file__).resolve().parent.parent
EPOCH = 1_733_280_000  # 2024-12-04T02:40:00Z
CREATED = "2024-12-04T02:40:00Z"
META = ImageMeta(name="debian-12-minimal", version="12-20241204", arch="amd64",
                 description="Debian 12 minimal", revision="sha256:" + "ab" * 32, epoch=EPOCH)
NAME = f"{META.name}_{META.version}_{META.arch}.{FORMAT}"
# A file capability as setcap writes it: VFS_CAP_REVISION_2, effective, cap_net_raw permitted.
CAPABILITY = b"\x01\x00\x00\x02" + (1 << 13).to_bytes(4, "little") + bytes(12)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (owners, mknod, mount)")
needs_tools = pytest.mark.skipif(not (shutil.which("umoci") and shutil.which("skopeo")), reason="umoci, skopeo")


def make_tree(root: Path) -> bool:
    """A small rootfs with every kind of entry a template has. Returns whether the capability xattr took."""
    for d in ("etc", "usr/bin", "usr/share/empty", "home/user", "run", "dev", "tmp"):
        (root / d).mkdir(parents=True)
    os.chmod(root / "tmp", 0o1777)
    (root / "etc/hostname").write_text("template\n")
    (root / "etc/shadow").write_text("root:*:19000:0:99999:7:::\n")
    os.chmod(root / "etc/shadow", 0o640)
    (root / "usr/bin/tool").write_bytes(b"\x7fELF" + bytes(4000))
    os.chmod(root / "usr/bin/tool", 0o755)
    os.link(root / "usr/bin/tool", root / "usr/bin/tool-alias")
    (root / "usr/bin/su").write_bytes(b"setuid\n")
    os.chmod(root / "usr/bin/su", 0o4755)
    (root / "usr/bin/ping").write_bytes(b"ping\n")
    os.chmod(root / "usr/bin/ping", 0o755)
    (root / "bin").symlink_to("usr/bin")
    (root / "etc/dangling").symlink_to("/nowhere")
    (root / "home/user/notes").write_text("mine\n")
    # incompressible, so the layer outgrows the small tmpfs of the disk-full tests
    (root / "usr/share/blob").write_bytes(random.Random(7).randbytes(300_000))
    os.mkfifo(root / "run/initctl", 0o600)
    if os.geteuid() == 0:
        os.chown(root / "etc/shadow", 0, 42)
        os.chown(root / "home/user", 1000, 1000)
        os.chown(root / "home/user/notes", 1000, 1000)
    try:
        os.setxattr(root / "usr/bin/ping", "security.capability", CAPABILITY)
        cap = True
    except OSError:
        cap = False
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (EPOCH + 99.5, EPOCH + 99.5), follow_symlinks=False)
    return cap


def tar_of(root: Path, path: Path) -> Path:
    with open(path, "wb") as f:
        write_tar(root, f, EPOCH)
    return path


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> tuple[Path, bool]:
    """(the template tar, whether it holds a file capability)"""
    work = tmp_path_factory.mktemp("template")
    (work / "root").mkdir()
    cap = make_tree(work / "root")
    return tar_of(work / "root", work / "template.tar"), cap


@pytest.fixture(scope="module")
def built(template, tmp_path_factory) -> tuple[Path, OciImage]:
    out = tmp_path_factory.mktemp("image") / NAME
    with open(template[0], "rb") as src:
        return out, export(src, out, META)


def exported(tar: Path, dest: Path, meta: ImageMeta = META) -> OciImage:
    with open(tar, "rb") as src:
        return export(src, dest, meta)


def members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path, "r:") as tar:
        return tar.getmembers()


def blob(archive: Path, digest: str) -> bytes:
    with tarfile.open(archive, "r:") as tar:
        f = tar.extractfile("blobs/sha256/" + digest.removeprefix("sha256:"))
        assert f is not None
        return f.read()


def document(archive: Path, name: str) -> tuple[bytes, dict]:
    with tarfile.open(archive, "r:") as tar:
        f = tar.extractfile(name)
        assert f is not None
        data = f.read()
    return data, json.loads(data)


# --- 1. determinism -----------------------------------------------------------------------------------------------

def test_the_same_tar_gives_the_same_bytes_and_the_sink_gives_what_export_gives(template, built, tmp_path):
    tar, _ = template
    out, image = built
    again = exported(tar, tmp_path / NAME)
    assert again == image and (tmp_path / NAME).read_bytes() == out.read_bytes()
    assert image.diff_id == "sha256:" + hashlib.sha256(tar.read_bytes()).hexdigest()
    assert image.compression == {"format": "gzip", "implementation": "zlib", "version": zlib.ZLIB_RUNTIME_VERSION,
                                 "level": 6}

    # pack.py's tee: many writes of every size (tarfile's are 10 KiB), then close(); into a hidden .part name
    sink_dest = tmp_path / "sink" / f".{NAME}.part"
    sink_dest.parent.mkdir()
    sink = LayerSink(sink_dest, META)
    data, pos, sizes = tar.read_bytes(), 0, [1, 7, 511, 512, 513, 4097, 10240, 65537, 1 << 20, (1 << 20) + 3]
    for i in range(10**6):
        if pos >= len(data):
            break
        n = sizes[i % len(sizes)]
        assert sink.write(data[pos:pos + n]) == len(data[pos:pos + n])
        pos += n
    sink.close()
    assert sink.image == image and sink_dest.read_bytes() == out.read_bytes()
    assert os.listdir(sink_dest.parent) == [sink_dest.name]  # its temporary layer is gone

    # Another epoch or description: another config, so another manifest; the layer is the same.
    for changed in (dataclasses.replace(META, epoch=EPOCH + 1), dataclasses.replace(META, description="other")):
        other = exported(tar, tmp_path / "other.oci.tar", changed)
        assert other.config_digest != image.config_digest and other.manifest_digest != image.manifest_digest
        assert (other.layer_digest, other.diff_id) == (image.layer_digest, image.diff_id)


def test_the_gzip_bytes_are_zlibs_at_level_6_with_no_name_and_no_time(template, built):
    tar, _ = template
    out, image = built
    layer = blob(out, image.layer_digest)
    assert len(layer) == image.layer_size and "sha256:" + hashlib.sha256(layer).hexdigest() == image.layer_digest
    # magic, deflate, no flags (no name), mtime 0, no extra flags (level 6), OS 3 (Unix)
    assert layer[:10] == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03"
    assert gzip.decompress(layer) == tar.read_bytes()
    assert subprocess.run(["gzip", "-dc"], input=layer, capture_output=True, check=True).stdout == tar.read_bytes()
    c = zlib.compressobj(6, zlib.DEFLATED, 31)
    assert c.compress(tar.read_bytes()) + c.flush() == layer
    # A known answer: a zlib (or a zlib-ng posing as one) that deflates otherwise changes every digest.
    rand = random.Random(1)
    sample = b"".join(rand.randbytes(i % 64) + b"tmplbuild template %d\n" % (i % 97) for i in range(20000))
    c = zlib.compressobj(6, zlib.DEFLATED, 31)
    assert hashlib.sha256(c.compress(sample) + c.flush()).hexdigest() == \
        "cfb65efaaddad78ffce7f951b9f4f8f256e5d3b375f736b1ba9b8fd9aee3f62a", zlib.ZLIB_RUNTIME_VERSION


# --- 2. what Proxmox VE reads ---------------------------------------------------------------------------------------

# pve-storage src/PVE/Storage.pm, $VZTMPL_EXT_RE_1, as Plugin.pm's list_templates / parse_volname apply it: a
# template is `<anything>.tar` (the OCI case, format "tar") or `.tar.(gz|xz|zst|bz2)`.
VZTMPL_RE = re.compile(r"/([^/]+\.(?:(tar)(?!\.)|tar\.(gz|xz|zst|bz2)))$", re.IGNORECASE)


def proxmox_detects_oci(path: Path) -> bool:
    """pve-container src/PVE/LXC/Create.pm, archive_is_oci_format: the file name ends in .tar and `tar -tf` lists a
    line `oci-layout`, a line `index.json` and a line starting with `blobs/`."""
    if not re.search(r"\.tar$", str(path)):
        return False
    lines = subprocess.run(["tar", "-tf", str(path)], capture_output=True, check=True, text=True).stdout.splitlines()
    return "oci-layout" in lines and "index.json" in lines and any(re.match(r"^blobs/", ln) for ln in lines)


def proxmox_import(path: Path) -> tuple[dict, bytes]:
    """What proxmox-rs proxmox-oci/src/lib.rs (parse_and_extract_image, parse_image, build_layer_map,
    extract_image_rootfs) and oci_tar_image.rs (OciTarImage::new, image_manifest) do, which
    PVE::RS::OCI::parse_and_extract_image runs for restore_oci_archive (pve-container, no architecture given):
    index the members by path, read `index.json` (that exact path), take the first manifest of the image manifest
    media type, open blobs as `blobs/<algorithm>/<hex>`, require the config's media type, map each diff_id to a
    layer by the sha256 of its gunzipped content, and unpack those layers. Returns (config.config, layer tar)."""
    with tarfile.open(path, "r:") as tar:
        entries = {m.name: m for m in tar.getmembers()}

        def open_blob(digest: str) -> bytes:
            algorithm, hexdigest = digest.split(":")
            f = tar.extractfile(entries[f"blobs/{algorithm}/{hexdigest}"])
            assert f is not None
            return f.read()

        index = json.load(tar.extractfile(entries["index.json"]))  # type: ignore[arg-type]
        descriptor = next(d for d in index["manifests"] if d["mediaType"] == MEDIA_MANIFEST)
        manifest = json.loads(open_blob(descriptor["digest"]))
        assert manifest["config"]["mediaType"] == MEDIA_CONFIG
        config = json.loads(open_blob(manifest["config"]["digest"]))
        layers = {}
        for layer in manifest["layers"]:
            assert layer["mediaType"] == MEDIA_LAYER
            content = gzip.decompress(open_blob(layer["digest"]))
            layers["sha256:" + hashlib.sha256(content).hexdigest()] = content
        unpacked = [layers[diff_id] for diff_id in config["rootfs"]["diff_ids"]]  # UnknownLayerDigest otherwise
    assert len(unpacked) == 1
    return config["config"], unpacked[0]


def test_proxmox_takes_it_for_an_oci_template_and_a_system_container(template, built):
    tar, _ = template
    out, image = built
    assert proxmox_detects_oci(out)
    match = VZTMPL_RE.search("/" + out.name)
    assert match and match.group(1) == out.name and match.group(2) == "tar"
    config, layer = proxmox_import(out)
    assert layer == tar.read_bytes()
    # restore_oci_archive: init command = Entrypoint + Cmd; only one other than /sbin/init makes an application
    # container (entrypoint, cmode console, host-managed network). StopSignal becomes lxc.signal.halt (SIGTERM when
    # absent, which systemd takes as "re-execute"). Env would be copied into the container's `env`: none.
    assert (config.get("Entrypoint") or []) + config["Cmd"] == ["/sbin/init"]
    assert config["StopSignal"] == "SIGRTMIN+3"
    assert not {"Env", "User", "WorkingDir", "Volumes", "Entrypoint"} & set(config)

    # The members, exactly, deterministic: no ./, no directories, USTAR headers without pax, owner 0:0 unnamed,
    # 0644, the epoch, in a fixed order.
    infos = members(out)
    assert [m.name for m in infos] == ["oci-layout", "index.json", "blobs/sha256/" + image.manifest_digest[7:],
                                       "blobs/sha256/" + image.config_digest[7:],
                                       "blobs/sha256/" + image.layer_digest[7:]]
    for m in infos:
        assert (m.type, m.uid, m.gid, m.uname, m.gname, m.mode, m.mtime) == (tarfile.REGTYPE, 0, 0, "", "", 0o644,
                                                                               EPOCH)
        assert m.pax_headers == {}
    raw = out.read_bytes()
    offset = 0
    for m in infos:
        header = raw[offset:offset + 512]
        assert header[156:157] == b"0" and header[257:265] == b"ustar\x0000", m.name
        offset += 512 + m.size + (-m.size % 512)
    assert raw[offset:].count(0) == len(raw) - offset >= 1024 and len(raw) % 10240 == 0


# --- 3. the documents -------------------------------------------------------------------------------------------------

def test_config_manifest_and_index_say_what_they_must(built):
    out, image = built
    raw_index, index = document(out, "index.json")
    raw_layout, layout = document(out, "oci-layout")
    raw_manifest, raw_config = blob(out, image.manifest_digest), blob(out, image.config_digest)
    manifest, config = json.loads(raw_manifest), json.loads(raw_config)
    for raw, doc in ((raw_index, index), (raw_layout, layout), (raw_manifest, manifest), (raw_config, config)):
        assert raw == json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()  # canonical
    assert layout == {"imageLayoutVersion": "1.0.0"}
    assert index == {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": [{
        "mediaType": MEDIA_MANIFEST, "digest": image.manifest_digest, "size": image.manifest_size,
        "platform": {"os": "linux", "architecture": "amd64"},
        "annotations": {"org.opencontainers.image.ref.name": "12-20241204-amd64"}}]}
    assert image.manifest_size == len(raw_manifest)
    assert manifest == {
        "schemaVersion": 2, "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": image.config_digest, "size": len(raw_config)},
        "layers": [{"mediaType": MEDIA_LAYER, "digest": image.layer_digest, "size": image.layer_size}],
        "annotations": {"org.opencontainers.image.created": CREATED, "org.opencontainers.image.version": META.version,
                        "org.opencontainers.image.title": META.name,
                        "org.opencontainers.image.revision": META.revision}}
    assert config == {
        "created": CREATED, "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/sbin/init"], "StopSignal": "SIGRTMIN+3", "Labels": {
            "org.opencontainers.image.version": META.version, "org.opencontainers.image.created": CREATED,
            "org.opencontainers.image.title": META.name, "org.opencontainers.image.description": META.description,
            "org.opencontainers.image.revision": META.revision}},
        "rootfs": {"type": "layers", "diff_ids": [image.diff_id]},
        "history": [{"created": CREATED, "created_by": f"tmplbuild {__version__} {META.name}"}]}
    assert image.platform == {"os": "linux", "architecture": "amd64"}
    assert image.doc() == {"media_type": MEDIA_MANIFEST, "manifest_digest": image.manifest_digest,
                           "manifest_size": image.manifest_size, "config_digest": image.config_digest,
                           "layer_digest": image.layer_digest, "layer_size": image.layer_size,
                           "diff_id": image.diff_id, "layer_compression": image.compression,
                           "platform": image.platform}


@pytest.mark.parametrize("arch, platform", [
    ("armhf", {"architecture": "arm", "variant": "v7"}), ("arm64", {"architecture": "arm64", "variant": "v8"}),
    ("i386", {"architecture": "386"}), ("ppc64el", {"architecture": "ppc64le"}),
    ("riscv64", {"architecture": "riscv64"}),
])
def test_debian_architectures_become_oci_platforms(template, tmp_path, arch, platform):
    out = tmp_path / "x.oci.tar"
    image = exported(template[0], out, dataclasses.replace(META, arch=arch))
    assert image.platform == {"os": "linux", **platform}
    assert document(out, "index.json")[1]["manifests"][0]["platform"] == {"os": "linux", **platform}
    config = json.loads(blob(out, image.config_digest))
    assert {k: config[k] for k in ("os", *platform)} == {"os": "linux", **platform}
    assert "variant" in config or "variant" not in platform


def test_metadata_that_cannot_make_an_image_is_refused_up_front():
    with pytest.raises(UsageError, match="no OCI platform"):
        dataclasses.replace(META, arch="sparc")
    with pytest.raises(UsageError, match="OCI image layout's grammar"):
        dataclasses.replace(META, version="12.8~rc1")
    with pytest.raises(UsageError, match="epoch"):
        dataclasses.replace(META, epoch=-1)


def test_the_record_round_trips_and_is_read_strictly(built):
    _, image = built
    assert OciImage.from_doc(json.loads(json.dumps(image.doc()))) == image
    for key, value, field in (("manifest_digest", "sha256:" + "A" * 64, "manifest_digest"),
                              ("config_digest", "md5:" + "0" * 32, "config_digest"),
                              ("diff_id", None, "diff_id"), ("layer_size", -1, "layer_size"),
                              ("manifest_size", True, "manifest_size"), ("layer_size", 1.0, "layer_size"),
                              ("media_type", MEDIA_INDEX, "media_type"),
                              ("layer_compression", {"format": "zstd"}, "layer_compression"),
                              ("platform", {"os": "linux"}, "platform"), ("extra", 1, "unknown extra")):
        with pytest.raises(ValueError, match=field):
            OciImage.from_doc({**image.doc(), key: value})
    doc = image.doc()
    del doc["diff_id"]
    with pytest.raises(ValueError, match="missing diff_id"):
        OciImage.from_doc(doc)


# --- 4. the tools read the same tree --------------------------------------------------------------------------------

def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry below root: type, permissions, owner, symlink target or content hash, capability, and which
    other names share its inode (hard links)."""
    inodes: dict[int, list[str]] = {}
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [""] * (dirpath == str(root)) + dirnames + filenames:
            path = os.path.join(dirpath, name) if name else dirpath
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                what = hashlib.sha256(Path(path).read_bytes()).hexdigest()
                inodes.setdefault(st.st_ino, []).append(rel)
            else:
                what = os.readlink(path) if stat.S_ISLNK(st.st_mode) else ""
            try:
                cap = os.getxattr(path, "security.capability", follow_symlinks=False)
            except OSError:
                cap = b""
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, what, cap,
                        st.st_ino)
    links = {rel: tuple(sorted(group)) for group in inodes.values() for rel in group}
    return {rel: v[:-1] + (links.get(rel, ()),) for rel, v in out.items()}


@needs_root
@needs_tools
def test_umoci_unpacks_the_same_tree_as_tar_and_skopeo_reads_the_digest(template, built, tmp_path):
    tar, cap = template
    out, image = built
    plain = tmp_path / "plain"
    plain.mkdir()
    subprocess.run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=security.capability", "-xpf", str(tar),
                    "-C", str(plain)], check=True)
    layout = tmp_path / "layout"
    with tarfile.open(out, "r:") as archive:
        archive.extractall(layout, filter="data") if hasattr(tarfile, "data_filter") else archive.extractall(layout)
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:{META.ref_name}", str(bundle)], check=True,
                   capture_output=True)
    expected, unpacked = snapshot(plain), snapshot(bundle / "rootfs")
    assert unpacked == expected
    assert expected["usr/bin/su"][1] == 0o4755 and expected["home/user/notes"][2:4] == (1000, 1000)
    assert stat.S_ISFIFO(expected["run/initctl"][0]) and expected["bin"][4] == "usr/bin"
    assert expected["usr/bin/tool"][-1] == ("usr/bin/tool", "usr/bin/tool-alias")
    assert expected["dev"][0] == stat.S_IFDIR and not os.listdir(bundle / "rootfs/dev")
    if cap:
        assert expected["usr/bin/ping"][5] == CAPABILITY
    runtime = json.loads((bundle / "config.json").read_text())  # umoci's runtime config from the image config
    assert runtime["process"]["args"] == ["/sbin/init"]

    inspect = json.loads(subprocess.run(["skopeo", "inspect", f"oci-archive:{out}"], capture_output=True,
                                        check=True).stdout)
    assert inspect["Digest"] == image.manifest_digest and inspect["Layers"] == [image.layer_digest]
    assert (inspect["Architecture"], inspect["Os"], inspect["Created"]) == ("amd64", "linux", CREATED)
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    copy = tmp_path / "copy"
    subprocess.run(["skopeo", "copy", "--quiet", "--policy", str(policy), f"oci-archive:{out}:{META.ref_name}",
                    f"oci:{copy}:x"], check=True, capture_output=True)
    copied = json.loads((copy / "index.json").read_text())["manifests"]
    assert [m["digest"] for m in copied] == [image.manifest_digest]  # no conversion: the same image


# --- 5. verify_archive ---------------------------------------------------------------------------------------------

def rewrite(src: Path, dest: Path, change) -> None:
    """dest = src's members, each through change(info, data) -> list of (info, data)."""
    with tarfile.open(src, "r:") as tin, tarfile.open(dest, "w", format=tarfile.USTAR_FORMAT) as tout:
        for m in tin.getmembers():
            f = tin.extractfile(m)
            for info, data in change(m, f.read() if f else b""):
                info.size = len(data)
                tout.addfile(info, io.BytesIO(data))


def test_verify_accepts_the_archive_and_refuses_what_differs(template, built, tmp_path):
    tar, _ = template
    out, image = built
    verify_archive(out, image)
    info = read_archive(out)
    assert info.manifest_digest == image.manifest_digest and info.layer_size == image.layer_size
    assert info.config["rootfs"]["diff_ids"] == [image.diff_id]

    def refused(path: Path, expected: OciImage, match: str) -> None:
        with pytest.raises(AuthenticityError, match=match) as exc:
            verify_archive(path, expected)
        assert exc.value.check == "oci image" and exc.value.exit_code == 3

    flipped = tmp_path / "flipped.oci.tar"
    data = bytearray(out.read_bytes())
    data[members(out)[-1].offset_data + image.layer_size // 2] ^= 0x01  # in the middle of the layer
    flipped.write_bytes(bytes(data))
    refused(flipped, image, "blobs/sha256/" + image.layer_digest[7:] + ": sha256: found sha256:")

    other = tmp_path / "other.oci.tar"
    exported(tar, other, dataclasses.replace(META, description="another"))
    refused(other, image, f"manifest digest: found sha256:[0-9a-f]{{64}}, expected {image.manifest_digest}")

    extra = tmp_path / "extra.oci.tar"
    rewrite(out, extra, lambda m, d: [(m, d)] + [(tarfile.TarInfo("README"), b"hi\n")] * (m.name == "oci-layout"))
    refused(extra, image, "member 'README'")
    extra_blob = tmp_path / "extra-blob.oci.tar"
    junk = tarfile.TarInfo("blobs/sha256/" + hashlib.sha256(b"junk").hexdigest())
    rewrite(out, extra_blob, lambda m, d: [(m, d)] + [(junk, b"junk")] * (m.name == "index.json"))
    refused(extra_blob, image, "blobs the manifest does not name")

    def dot_slash(m, d):
        m.name = "./" + m.name
        return [(m, d)]
    dotted = tmp_path / "dotted.oci.tar"
    rewrite(out, dotted, dot_slash)
    assert proxmox_detects_oci(dotted) is False  # Proxmox would not even take it for an OCI image
    refused(dotted, image, "member './oci-layout'")

    with_dir = tmp_path / "dir.oci.tar"
    blobs_dir = tarfile.TarInfo("blobs")
    blobs_dir.type = tarfile.DIRTYPE
    rewrite(out, with_dir, lambda m, d: [(blobs_dir, b"")] * (m.name == "index.json") + [(m, d)])
    refused(with_dir, image, "regular files only")

    twice = tmp_path / "twice.oci.tar"
    rewrite(out, twice, lambda m, d: [(m, d)] * (2 if m.name == "index.json" else 1))
    refused(twice, image, "appears twice")

    # The same compressed layer cannot have another content, so a diff_id mismatch is an expectation that differs.
    refused(out, dataclasses.replace(image, diff_id="sha256:" + "0" * 64), "diff_ids: found")
    refused(out, dataclasses.replace(image, platform={"os": "linux", "architecture": "arm64"}), "platform")

    hidden = tmp_path / "hidden.oci.tar"  # a member after the end-of-archive blocks, which tar readers never see
    hidden.write_bytes(out.read_bytes() + (tmp_path / "extra.oci.tar").read_bytes()[:1024])
    refused(hidden, image, "after the end-of-archive")
    truncated = tmp_path / "truncated.oci.tar"
    truncated.write_bytes(out.read_bytes()[:-20000])
    refused(truncated, image, "truncated")


# --- 6. refusals and failures ----------------------------------------------------------------------------------------

def assert_nothing_left(directory: Path) -> None:
    assert os.listdir(directory) == [], os.listdir(directory)


@needs_root
def test_a_device_node_under_dev_is_refused_and_nothing_is_written(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    make_tree(root)
    os.mknod(root / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    tar = tar_of(root, tmp_path / "t.tar")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(UnsafeContentError, match=r"'\./dev/null' is under dev/") as exc:
        exported(tar, out_dir / NAME)
    assert exc.value.exit_code == 6
    assert_nothing_left(out_dir)
    proc = subprocess.run([sys.executable, "-m", "tmplbuild.oci.image", str(tar), str(out_dir / NAME), "--name", "t",
                           "--version", "1", "--arch", "amd64", "--epoch", str(EPOCH)], capture_output=True, cwd=ROOT)
    assert proc.returncode == 6 and b"tmplbuild: oci layer: './dev/null' is under dev/" in proc.stderr
    assert_nothing_left(out_dir)


def tar_with(tmp_path: Path, name: str, fmt: int = tarfile.PAX_FORMAT, kind: bytes = tarfile.REGTYPE) -> Path:
    path = tmp_path / "crafted.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        for entry, entry_kind in ((".", tarfile.DIRTYPE), ("./etc", tarfile.DIRTYPE), (name, kind)):
            info = tarfile.TarInfo(entry)
            info.type = entry_kind
            info.mtime = EPOCH
            data = b"x" if entry_kind == tarfile.REGTYPE else b""
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


LONG = "./" + "d" * 120  # a name too long for the USTAR field: it lives in a pax or GNU long-name header


@pytest.mark.parametrize("name, fmt, kind, match", [
    ("./etc/.wh.passwd", tarfile.PAX_FORMAT, tarfile.REGTYPE, "whiteout"),
    ("./.wh..wh..opq", tarfile.PAX_FORMAT, tarfile.REGTYPE, "whiteout"),
    ("./etc/.wh.dir", tarfile.PAX_FORMAT, tarfile.DIRTYPE, "whiteout"),
    (LONG + "/.wh.victim", tarfile.PAX_FORMAT, tarfile.REGTYPE, "whiteout"),
    (LONG + "/.wh.victim", tarfile.GNU_FORMAT, tarfile.REGTYPE, "whiteout"),
    ("./dev/sda", tarfile.USTAR_FORMAT, tarfile.BLKTYPE, "under dev/"),
    ("dev/console", tarfile.PAX_FORMAT, tarfile.REGTYPE, "under dev/"),
    ("./etc/../dev/null", tarfile.PAX_FORMAT, tarfile.REGTYPE, r"'\.\.' component"),
    ("./dev", tarfile.PAX_FORMAT, tarfile.SYMTYPE, "not a directory"),
])
def test_names_an_image_must_not_hold_are_refused(tmp_path, name, fmt, kind, match):
    tar = tar_with(tmp_path, name, fmt, kind)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(UnsafeContentError, match=match):
        exported(tar, out_dir / NAME)
    assert_nothing_left(out_dir)
    sink = LayerSink(out_dir / "sink.part", META)  # the builder's way: the refusal comes from write() or close()
    with pytest.raises(UnsafeContentError, match=match):
        sink.write(tar.read_bytes())
        sink.close()
    assert_nothing_left(out_dir)


def test_a_long_but_harmless_name_passes(tmp_path):
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        exported(tar_with(tmp_path, LONG + "/file", fmt), tmp_path / "ok.oci.tar")


def test_a_truncated_or_foreign_stream_is_refused(template, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    data = template[0].read_bytes()
    for bad, match in ((data[:len(data) // 2], "without its end-of-archive block"),
                       (gzip.compress(data[:100_000]), "bad header checksum"),
                       (data + data[:1024], "data after the tar stream's end-of-archive block")):
        with pytest.raises(UsageError, match=match):
            export(io.BytesIO(bad), out_dir / NAME, META)
        assert_nothing_left(out_dir)


@pytest.fixture
def small_tmpfs(tmp_path):
    """Mount a tmpfs of the size asked at tmp_path/small; unmounted afterwards."""
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        where = tmp_path / f"small{len(mounted)}"
        where.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmplbuild-pytest", str(where)], check=True)
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], check=True)


@needs_root
def test_a_full_disk_is_a_local_io_error_and_leaves_nothing(template, built, small_tmpfs):
    tar, _ = template
    _, image = built
    tiny = small_tmpfs(64 << 10)  # the layer itself does not fit
    with pytest.raises(LocalIOError, match="No space left on device"):
        exported(tar, tiny / NAME)
    assert_nothing_left(tiny)

    # The layer fits, the archive next to it does not: close() fails, and removes both.
    half = small_tmpfs((image.layer_size * 3 // 2 + 4095) // 4096 * 4096)
    sink = LayerSink(half / f".{NAME}.part", META)
    sink.write(tar.read_bytes())
    with pytest.raises(LocalIOError, match="No space left on device") as exc:
        sink.close()
    assert exc.value.exit_code == 7 and sink.image is None
    assert_nothing_left(half)


def test_abort_removes_what_the_sink_wrote_midway_or_after_close(template, tmp_path):
    data = template[0].read_bytes()
    midway = LayerSink(tmp_path / ".a.part", META)
    midway.write(data[:len(data) // 2])
    midway.abort()
    done = LayerSink(tmp_path / ".b.part", META)
    done.write(data)
    done.close()
    assert done.image is not None and (tmp_path / ".b.part").exists()
    done.abort()  # another output of the same pack failed: this one goes too
    assert done.image is None
    assert_nothing_left(tmp_path)


def test_the_command_reads_a_tar_zst_and_prints_the_digest(template, built, tmp_path):
    tar, _ = template
    _, image = built
    zst = tmp_path / "t.tar.zst"
    zst.write_bytes(zstandard.ZstdCompressor(level=3).compress(tar.read_bytes()))
    out = tmp_path / NAME
    proc = subprocess.run([sys.executable, "-m", "tmplbuild.oci.image", str(zst), str(out), "--name", META.name,
                           "--version", META.version, "--arch", META.arch, "--epoch", str(EPOCH),
                           "--description", META.description, "--revision", META.revision],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == image.manifest_digest + "\n"
    verify_archive(out, image)
