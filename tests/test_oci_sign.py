"""OCI images signed with containers' simple signing, verified by stock skopeo.

Real tools throughout: a Distribution registry on 127.0.0.1 (tests/oci_registry.py), skopeo 1.9.3 (containers/image
v5.23.1), gpg, and `tmplbuild serve` for the lookaside over HTTP. Every stock skopeo run gets its own --policy and
--registries.d (and an empty registries.conf and auth file): nothing of the host's /etc/containers is read."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import requests

from tests.conftest import gpg
from tests.oci_registry import (Registry, free_port, htpasswd_entry, kill_agents, make_archive, make_key,
                                registry)  # noqa: F401  (registry: a fixture)
from tmplbuild.errors import ExitCode, LocalIOError, TransportError, UsageError
from tmplbuild.oci import consumer, simplesign, skopeo
from tmplbuild.sign import Signer

HEX = "ab" * 32
DIGEST = f"sha256:{HEX}"


# ---------------------------------------------------------------------------------------------- helpers


def armored(home: Path, fpr: str) -> bytes:
    return gpg(home, "--armor", "--export", fpr).stdout


def trust(out: Path, scope: str, lookaside: str, material: bytes, fprs: tuple[str, ...], strict: bool = False
          ) -> Path:
    consumer.write(out, consumer.Setup(name="tmplbuild", registry=scope, lookaside=lookaside, keys=material,
                                       fingerprints=fprs, strict=strict))
    return out


def stock_copy(w, trust_dir: Path, ref: str) -> subprocess.CompletedProcess[str]:
    """Stock skopeo pulling `ref` under the trust files in `trust_dir` (what a node admin runs)."""
    out = w.tmp / f"pulled-{len(list(w.tmp.glob('pulled-*')))}.tar"
    return subprocess.run(["skopeo", "--policy", str(trust_dir / "policy.json"), "--registries.d",
                           str(trust_dir / "registries.d"), "copy", "--src-tls-verify=false", "--remove-signatures",
                           f"docker://{ref}", f"oci-archive:{out}"], capture_output=True, text=True, env=w.env,
                          timeout=120)


def rejected(proc: subprocess.CompletedProcess[str], why: str) -> None:
    assert proc.returncode != 0, proc.stderr
    assert re.search("signature", proc.stderr, re.I), proc.stderr
    assert why in proc.stderr, proc.stderr


class World:
    pass


@pytest.fixture(scope="module")
def w(registry, tmp_path_factory):  # noqa: F811
    """An image pushed to tmpl/demo:v1 with skopeo.push, signed for that tag into a file lookaside, and the trust
    files for the signing key."""
    x = World()
    x.tmp = tmp_path_factory.mktemp("oci")
    x.reg = registry
    x.authfile = x.tmp / "auth.json"
    x.authfile.write_text('{"auths": {}}\n')
    (x.tmp / "registries.conf").write_text("")
    x.env = {**os.environ, "CONTAINERS_REGISTRIES_CONF": str(x.tmp / "registries.conf"),
             "REGISTRY_AUTH_FILE": str(x.authfile)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CONTAINERS_REGISTRIES_CONF", str(x.tmp / "registries.conf"))
        x.home, x.other_home = x.tmp / "gnupg", x.tmp / "gnupg-other"
        x.fpr, x.other_fpr = make_key(x.home, "ci"), make_key(x.other_home, "other")
        x.archive = x.tmp / "demo.oci.tar"
        x.digest = make_archive(x.archive, b"signed\n")
        x.scope = f"{registry.host}/tmpl"
        x.ref = f"{x.scope}/demo:v1"
        x.stored = skopeo.push(x.archive, x.ref, tls_verify=False, authfile=x.authfile)
        x.signer = Signer(x.home, x.fpr)
        x.lookaside = x.tmp / "lookaside"
        x.signature = simplesign.sign(x.signer, x.ref, x.digest)
        x.sig_path = x.lookaside / simplesign.lookaside_path(x.ref, x.digest, 1)
        x.sig_path.parent.mkdir(parents=True)
        x.sig_path.write_bytes(x.signature)
        x.trust = trust(x.tmp / "trust", x.scope, x.lookaside.as_uri(), armored(x.home, x.fpr), (x.fpr,))
        yield x
    x.signer.close()
    kill_agents(x.home)
    kill_agents(x.other_home)


# ---------------------------------------------------------------------------------------------- stock skopeo


def test_push_returns_the_archives_digest_and_the_tag_points_at_it(w):
    assert w.stored == w.digest
    assert skopeo.inspect_digest(w.ref, tls_verify=False, authfile=w.authfile) == w.digest


def test_stock_skopeo_accepts_the_signed_image_by_tag_and_by_digest(w):
    proc = stock_copy(w, w.trust, w.ref)
    assert proc.returncode == 0, proc.stderr
    # matchRepoDigestOrExact: by digest, a signature naming any tag of the repository is enough
    proc = stock_copy(w, w.trust, f"{w.scope}/demo@{w.digest}")
    assert proc.returncode == 0, proc.stderr


def test_the_files_written(w):
    assert (w.trust / "registries.d/tmplbuild.yaml").read_text() == (
        f"# tmplbuild oci trust: signatures of the images under {w.scope}\n"
        f'docker:\n  "{w.scope}":\n    lookaside: "{w.lookaside.as_uri()}"\n    sigstore: "{w.lookaside.as_uri()}"\n')
    assert json.loads((w.trust / "policy.json").read_text()) == {
        "default": [{"type": "insecureAcceptAnything"}],
        "transports": {"docker": {w.scope: [{"type": "signedBy", "keyType": "GPGKeys",
                                             "keyPath": str(w.trust / "tmplbuild.gpg")}]}}}
    ring = (w.trust / "tmplbuild.gpg").read_bytes()
    assert ring == gpg(w.home, "--export", w.fpr).stdout  # binary, the key exactly as gpg exports it
    assert sorted(p.relative_to(w.trust).as_posix() for p in w.trust.rglob("*") if p.is_file()) == [
        "policy.json", "registries.d/tmplbuild.yaml", "tmplbuild.gpg"]


@pytest.mark.parametrize("key", ["lookaside", "sigstore"])
def test_skopeo_1_9_reads_either_registries_d_key(w, key):
    # consumer writes both: `lookaside` (containers/image >= 5.22) and `sigstore` (older ones, still read)
    alone = w.tmp / f"trust-{key}-only"
    shutil.copytree(w.trust, alone)
    (alone / "registries.d/tmplbuild.yaml").write_text(
        f'docker:\n  "{w.scope}":\n    {key}: "{w.lookaside.as_uri()}"\n')
    proc = stock_copy(w, alone, w.ref)
    assert proc.returncode == 0, proc.stderr


def test_another_keys_keyring_refuses_it(w):
    other = trust(w.tmp / "trust-other", w.scope, w.lookaside.as_uri(), armored(w.other_home, w.other_fpr),
                  (w.other_fpr,))
    rejected(stock_copy(w, other, w.ref), "Invalid GPG signature")


def test_an_unsigned_image_is_refused(w):
    make_archive(w.tmp / "unsigned.oci.tar", b"never signed\n")
    skopeo.push(w.tmp / "unsigned.oci.tar", f"{w.scope}/demo:unsigned", tls_verify=False, authfile=w.authfile)
    rejected(stock_copy(w, w.trust, f"{w.scope}/demo:unsigned"), "no signature exists")


def test_the_same_digest_under_another_tag_is_refused(w):
    # The registry holds the signed manifest under a second tag; the signature names :v1, and a pull by tag
    # needs a signature naming exactly that tag (matchRepoDigestOrExact).
    assert skopeo.push(w.archive, f"{w.scope}/demo:other", tls_verify=False, authfile=w.authfile) == w.digest
    rejected(stock_copy(w, w.trust, f"{w.scope}/demo:other"),
             f"Signature for identity {w.ref} is not accepted")


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_a_corrupted_signature_is_refused(w, damage):
    lookaside = w.tmp / f"lookaside-{damage}"
    shutil.copytree(w.lookaside, lookaside)
    sig = lookaside / simplesign.lookaside_path(w.ref, w.digest, 1)
    data = bytearray(w.signature)
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    elif damage == "truncate":
        data = data[:20]
    else:
        data = bytearray(b"not a signature\n")
    sig.write_bytes(bytes(data))
    corrupt = trust(w.tmp / f"trust-{damage}", w.scope, lookaside.as_uri(), armored(w.home, w.fpr), (w.fpr,))
    proc = stock_copy(w, corrupt, w.ref)
    # skopeo's words differ by damage ("No data", "Unexpected GPG signature count 0", gpgme's "Invalid GPG
    # signature"); all are the policy refusing the image
    assert proc.returncode != 0 and "Source image rejected: " in proc.stderr, proc.stderr


def test_strict_policy_refuses_what_lenient_accepts_outside_the_scope(w):
    make_archive(w.tmp / "elsewhere.oci.tar", b"elsewhere\n")
    ref = f"{w.reg.host}/elsewhere/x:t"
    skopeo.push(w.tmp / "elsewhere.oci.tar", ref, tls_verify=False, authfile=w.authfile)
    assert stock_copy(w, w.trust, ref).returncode == 0  # lenient: outside the scope, as stock policy.json
    strict = trust(w.tmp / "trust-strict", w.scope, w.lookaside.as_uri(), armored(w.home, w.fpr), (w.fpr,),
                   strict=True)
    proc = stock_copy(w, strict, ref)
    assert proc.returncode != 0 and "rejected by policy" in proc.stderr, proc.stderr
    assert stock_copy(w, strict, w.ref).returncode == 0


def test_a_signature_by_a_signing_subkey_is_refused_by_skopeo_so_sign_message_refuses_to_make_one(w):
    home = w.tmp / "gnupg-subkey"
    fpr = make_key(home, "subkey", caps="cert")
    try:
        with Signer(home, fpr) as signer, pytest.raises(UsageError, match="primary key"):
            signer.sign_message(b"x")
        # what gpg would make with --local-user FPR (the newest signing subkey): stock skopeo refuses it
        payload = simplesign.payload(w.ref, w.digest, "test", 1)
        lookaside = w.tmp / "lookaside-subkey"
        path = lookaside / simplesign.lookaside_path(w.ref, w.digest, 1)
        path.parent.mkdir(parents=True)
        path.write_bytes(gpg(home, "--local-user", fpr, "--sign", input=payload).stdout)
        sub = trust(w.tmp / "trust-subkey", w.scope, lookaside.as_uri(), armored(home, fpr), (fpr,))
        rejected(stock_copy(w, sub, w.ref), "is not accepted")
    finally:
        kill_agents(home)


# ---------------------------------------------------------------------------------------------- lookaside over HTTP


def test_lookaside_served_by_tmplbuild_serve(w):
    from tests.test_server import Server, init_repo
    from tests.test_server import kill_agents as kill_repo_agents
    from tests.test_server import make_key as make_repo_key

    base = w.tmp / "served"
    base.mkdir()
    key = make_repo_key(base)
    repo = init_repo(base / "repo", key)
    server = Server(repo, base / "logs")
    try:
        # Written after start-up: the server's start-up clean-up removes lookaside files no manifest lists.
        rel = f"sigstore/{simplesign.lookaside_path(w.ref, w.digest, 1)}"
        (repo / rel).parent.mkdir(parents=True)
        (repo / rel).write_bytes(w.signature)
        got = requests.get(server.url("/" + rel), timeout=10)
        assert got.status_code == 200 and got.content == w.signature  # '@' and '=' served as they are
        assert requests.get(server.url("/" + rel.replace("signature-1", "signature-2")), timeout=10
                            ).status_code == 404  # where skopeo stops reading
        served = trust(w.tmp / "trust-http", w.scope, server.url("/sigstore/"), armored(w.home, w.fpr), (w.fpr,))
        assert f'lookaside: "{server.base}/sigstore"' in (served / "registries.d/tmplbuild.yaml").read_text()
        proc = stock_copy(w, served, w.ref)
        assert proc.returncode == 0, proc.stderr
        push_unsigned_and_other(w)
        rejected(stock_copy(w, served, f"{w.scope}/demo:unsigned"), "no signature exists")
        rejected(stock_copy(w, served, f"{w.scope}/demo:other"), "is not accepted")
    finally:
        server.stop()
        kill_repo_agents(key[0])


def push_unsigned_and_other(w) -> None:
    """tmpl/demo:unsigned (an image never signed) and tmpl/demo:other (the signed image's digest under a tag no
    signature names), whichever tests ran before."""
    make_archive(w.tmp / "unsigned.oci.tar", b"never signed\n")
    skopeo.push(w.tmp / "unsigned.oci.tar", f"{w.scope}/demo:unsigned", tls_verify=False, authfile=w.authfile)
    skopeo.push(w.archive, f"{w.scope}/demo:other", tls_verify=False, authfile=w.authfile)


# ---------------------------------------------------------------------------------------------- skopeo runners


def test_pull_by_digest_writes_the_archive_and_refuses_tags(w):
    dest = w.tmp / "by-digest.oci.tar"
    skopeo.pull(f"{w.scope}/demo@{w.digest}", dest, tls_verify=False, authfile=w.authfile)
    assert skopeo.archive_manifest_digest(dest) == w.digest
    assert not list(w.tmp.glob(".*.part"))
    with pytest.raises(UsageError, match="by digest only"):
        skopeo.pull(w.ref, dest, tls_verify=False)
    with pytest.raises(TransportError, match="not in the registry: .*manifest unknown"):
        skopeo.pull(f"{w.scope}/demo@{DIGEST}", w.tmp / "missing.oci.tar", tls_verify=False, authfile=w.authfile)
    assert not (w.tmp / "missing.oci.tar").exists() and not list(w.tmp.glob(".*.part"))


def test_unreachable_registry_and_tls_against_plain_http_are_transport_errors(w, capfd):
    closed = f"127.0.0.1:{free_port()}"
    with pytest.raises(TransportError) as exc:
        skopeo.push(w.archive, f"{closed}/x/y:t", tls_verify=False, authfile=w.authfile)
    assert exc.value.exit_code == ExitCode.TRANSPORT and exc.value.check == "registry"
    assert "cannot reach the registry" in exc.value.message and "connection refused" in exc.value.message
    assert f"tmplbuild: warning: TLS verification is OFF for {closed}\n" in capfd.readouterr().err
    with pytest.raises(TransportError, match="TLS failure: .*server gave HTTP response to HTTPS client"):
        skopeo.push(w.archive, f"{w.reg.host}/x/y:t", authfile=w.authfile)  # TLS on: the default
    assert "TLS verification is OFF" not in capfd.readouterr().err
    with pytest.raises(TransportError, match="not in the registry"):
        skopeo.inspect_digest(f"{w.scope}/demo:nope", tls_verify=False, authfile=w.authfile)


def test_push_refused_for_authentication(w, tmp_path):
    entry = htpasswd_entry("alice", "s3cret-pass")
    if entry is None:
        pytest.skip("no bcrypt htpasswd maker: apt-get install apache2-utils (or python3 with crypt)")
    (tmp_path / "htpasswd").write_text(entry + "\n")
    reg = Registry(tmp_path / "auth-registry", htpasswd=tmp_path / "htpasswd")
    try:
        ref = f"{reg.host}/tmpl/demo:v1"
        for name, auths in (("none", {}), ("wrong", {reg.host: {"auth": _basic("alice", "wrong")}})):
            authfile = tmp_path / f"{name}.json"
            authfile.write_text(json.dumps({"auths": auths}))
            with pytest.raises(UsageError) as exc:
                skopeo.push(w.archive, ref, tls_verify=False, authfile=authfile)
            assert exc.value.check == "registry auth" and exc.value.exit_code == ExitCode.USAGE
            assert ref in exc.value.message and "authentication required" in exc.value.message
            assert "\n" not in str(exc.value)
        good = tmp_path / "good.json"
        good.write_text(json.dumps({"auths": {reg.host: {"auth": _basic("alice", "s3cret-pass")}}}))
        assert skopeo.push(w.archive, ref, tls_verify=False, authfile=good) == w.digest
        with pytest.raises(UsageError, match="registry auth"):
            skopeo.inspect_digest(ref, tls_verify=False, authfile=tmp_path / "none.json")
    finally:
        reg.stop()


def _basic(user: str, password: str) -> str:
    import base64
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def test_missing_skopeo_and_missing_files(w, monkeypatch):
    with pytest.raises(UsageError, match="no such file"):
        skopeo.push(w.tmp / "absent.oci.tar", w.ref, tls_verify=False)
    with pytest.raises(UsageError, match="registry auth: .*no such file"):
        skopeo.push(w.archive, w.ref, authfile=w.tmp / "absent.json")
    monkeypatch.setattr(skopeo, "SKOPEO", "skopeo-not-installed")
    with pytest.raises(UsageError, match="apt-get install skopeo") as exc:
        skopeo.push(w.archive, w.ref)
    assert exc.value.check == "skopeo"


# ---------------------------------------------------------------------------------------------- pure parts


def test_argv_builders_keep_tls_verification_on_unless_asked():
    p, r, d = Path("/p/policy.json"), Path("/p/registries.d"), Path("/p/digest")
    argv = skopeo.push_argv(Path("/out/a.oci.tar"), "reg.example.org/t/x:v1", policy=p, registries_d=r,
                            digestfile=d)
    assert argv == ["skopeo", "--policy", "/p/policy.json", "--registries.d", "/p/registries.d",
                    "--command-timeout", "1800s", "copy", "--preserve-digests", "--remove-signatures",
                    "--digestfile", "/p/digest", "--dest-tls-verify=true", "oci-archive:/out/a.oci.tar",
                    "docker://reg.example.org/t/x:v1"]
    off = skopeo.push_argv(Path("/out/a.oci.tar"), "reg.example.org/t/x:v1", policy=p, registries_d=r,
                           digestfile=d, tls_verify=False, authfile=Path("/etc/auth.json"), timeout=None)
    assert "--dest-tls-verify=false" in off and "--dest-tls-verify=true" not in off
    assert off[off.index("--authfile") + 1] == "/etc/auth.json" and "--command-timeout" not in off
    pull = skopeo.pull_argv(f"reg.example.org/t/x@{DIGEST}", Path("/o.tar"), policy=p, registries_d=r)
    assert "--src-tls-verify=true" in pull and pull[-2:] == [f"docker://reg.example.org/t/x@{DIGEST}",
                                                            "oci-archive:/o.tar"]
    assert "--tls-verify=false" in skopeo.inspect_argv("reg.example.org/t/x:v1", policy=p, registries_d=r,
                                                       tls_verify=False)
    with pytest.raises(UsageError, match="by digest only"):
        skopeo.pull_argv("reg.example.org/t/x:v1", Path("/o.tar"), policy=p, registries_d=r)
    with pytest.raises(UsageError, match="':'"):
        skopeo.push_argv(Path("/out/a:b.tar"), "reg.example.org/t/x:v1", policy=p, registries_d=r, digestfile=d)
    assert not any("pass" in a for a in off)  # credentials only ever through the auth file


@pytest.mark.parametrize("line, cls, check", [
    ('time="x" level=fatal msg="writing blob: checking whether a blob sha256:00 exists in r/x/y: unauthorized: '
     'authentication required"', UsageError, "registry auth"),
    ('time="x" level=fatal msg="denied: requested access to the resource is denied"', UsageError, "registry auth"),
    ('time="x" level=fatal msg="pinging container registry r: Get \\"https://r/v2/\\": x509: certificate signed '
     'by unknown authority"', TransportError, "registry"),
    ('time="x" level=fatal msg="dial tcp: lookup nonexistent.invalid: no such host"', TransportError, "registry"),
    ('time="x" level=fatal msg="reading manifest t in r/x: manifest unknown: manifest unknown"', TransportError,
     "registry"),
    ('time="x" level=fatal msg="writing blob: write /tmp/x: no space left on device"', LocalIOError, "registry"),
    ("something else entirely", TransportError, "registry"),
])
def test_classification_of_skopeos_last_line(line, cls, check):
    err = skopeo.classify(line, "r/x:t", "push")
    assert type(err) is cls and err.check == check and "push r/x:t: " in err.message
    assert '\\"' not in err.message and "\n" not in err.message


def test_classification_reads_the_whole_line_and_shows_its_end():
    long_ref = "reg.example.org/" + "/".join(["component"] * 20) + ":t"
    line = (f'time="x" level=fatal msg="Error parsing image name \\"docker://{long_ref}\\": reading manifest t in '
            f'{long_ref}: unauthorized: authentication required"')
    err = skopeo.classify(line, long_ref, "inspect")
    assert isinstance(err, UsageError) and err.check == "registry auth"
    assert err.message.endswith("unauthorized: authentication required (give the registry's credentials with "
                                "--authfile or `skopeo login`)") and "..." in err.message


def test_lookaside_path_follows_containers_image():
    # docker/registries_d.go: <reference.Path>@<algo>=<hex>/signature-<n>; the registry host and port dropped
    assert simplesign.lookaside_path("reg.example.org:5000/templates/debian-12-minimal:12-1-amd64", DIGEST, 1) == \
        f"templates/debian-12-minimal@sha256={HEX}/signature-1"
    assert simplesign.lookaside_path(f"localhost/a/b@{DIGEST}", DIGEST, 2) == f"a/b@sha256={HEX}/signature-2"
    assert simplesign.lookaside_path("docker.io/busybox:1", DIGEST, 1) == f"library/busybox@sha256={HEX}/signature-1"
    assert simplesign.lookaside_path("index.docker.io/u/x:1", DIGEST, 3).startswith("u/x@sha256=")
    for bad_index in (0, -1, True, 1000):
        with pytest.raises(UsageError):
            simplesign.lookaside_path("reg.example.org/a:t", DIGEST, bad_index)
    with pytest.raises(UsageError, match="another digest"):
        simplesign.lookaside_path(f"reg.example.org/a@sha256:{'cd' * 32}", DIGEST, 1)


@pytest.mark.parametrize("ref", [
    "templates/x:t",                    # no registry host: docker would read docker.io/templates/x
    "reg.example.org/Templates/x:t",    # uppercase path
    "reg.example.org/x",                # no tag
    "reg.example.org/x:-t",             # tag starting with '-'
    "reg.example.org/x:" + "t" * 129,   # tag too long
    f"reg.example.org/x:t@{DIGEST}",    # tag and digest
    "reg.example.org/x@sha256:AB",      # bad digest
    "reg.example.org/x//y:t", "reg.example.org/x/:t", "reg.example.org/x__-y:t", "reg.example.org/.x:t",
    "-reg.example.org/x:t", "reg.example.org:port/x:t", "reg.example.org/x:t ", "reg.example.org/é:t",
    "reg.example.org/" + "a" * 250 + ":t",
])
def test_bad_references_are_usage_errors(ref):
    with pytest.raises(UsageError) as exc:
        simplesign.parse_reference(ref)
    assert exc.value.check == "oci reference" and exc.value.exit_code == ExitCode.USAGE


def test_good_references():
    assert simplesign.parse_reference("127.0.0.1:5000/tmpl/demo:v1") == \
        simplesign.Reference("127.0.0.1:5000", "tmpl/demo", "v1")
    ref = simplesign.parse_reference("Reg-1.Example.org/a.b/c__d/e-f--g:V_1.2-3")
    assert (ref.registry, ref.path, ref.tag, ref.name) == ("Reg-1.Example.org", "a.b/c__d/e-f--g", "V_1.2-3",
                                                           "Reg-1.Example.org/a.b/c__d/e-f--g")
    assert str(simplesign.parse_reference("localhost/x:t")) == "localhost/x:t"
    assert str(simplesign.parse_reference("docker.io/x:t")) == "docker.io/library/x:t"
    assert simplesign.parse_pinned(f"reg.example.org/x@{DIGEST}").digest == DIGEST
    assert simplesign.parse_repository("reg.example.org:5000") == "reg.example.org:5000"
    assert simplesign.parse_repository("reg.example.org/tmpl") == "reg.example.org/tmpl"
    for scope in ("reg.example.org/tmpl:t", "tmpl", "docker.io/x"):
        with pytest.raises(UsageError, match="oci registry"):
            simplesign.parse_repository(scope)


def test_payload_is_canonical_and_reads_back():
    data = simplesign.payload("reg.example.org/t/x:v1", DIGEST, "tmplbuild 0.1.0", 1780000000)
    assert data == (b'{"critical":{"identity":{"docker-reference":"reg.example.org/t/x:v1"},'
                    b'"image":{"docker-manifest-digest":"' + DIGEST.encode() + b'"},'
                    b'"type":"atomic container signature"},'
                    b'"optional":{"creator":"tmplbuild 0.1.0","timestamp":1780000000}}')
    assert simplesign.parse_payload(data) == simplesign.Payload("reg.example.org/t/x:v1", DIGEST,
                                                                "tmplbuild 0.1.0", 1780000000)
    for bad in (b'{"critical":{"type":"x","image":{},"identity":{}},"optional":{}}',
                data.replace(b'"optional"', b'"extra":1,"optional"'), b'{"critical":1,"critical":2}'):
        with pytest.raises(UsageError, match="oci signature"):
            simplesign.parse_payload(bad)
    for args in (("reg.example.org/t/x", DIGEST, "c", 1), ("reg.example.org/t/x:v1", "sha256:AB", "c", 1),
                 ("reg.example.org/t/x:v1", DIGEST, "c\n", 1), ("reg.example.org/t/x:v1", DIGEST, "c", True)):
        with pytest.raises(UsageError):
            simplesign.payload(*args)


def test_sign_message_is_a_signed_message_gpg_accepts(throwaway_key, tmp_path):
    home, fpr, keyring = throwaway_key
    data = simplesign.payload("reg.example.org/t/x:v1", DIGEST, "test", 1)
    with Signer(home, fpr) as signer:
        signed = signer.sign_message(data)
        detached = signer.sign(data, armored=False)  # unchanged: still a detached signature
    assert not signed.startswith(b"-----") and signed != detached
    (tmp_path / "msg.gpg").write_bytes(signed)
    verify_home = tmp_path / "verify"
    verify_home.mkdir(mode=0o700)
    gpg(verify_home, "--import", str(keyring))
    status = gpg(verify_home, "--status-fd", "1", "--output", str(tmp_path / "literal"), "--verify",
                 str(tmp_path / "msg.gpg")).stdout.decode()  # no data file: the data is inside
    validsig = [ln.split() for ln in status.splitlines() if ln.startswith("[GNUPG:] VALIDSIG")][0]
    assert validsig[2] == fpr and validsig[-1] == fpr  # made by the primary key itself
    assert validsig[9] == "8" and validsig[10] == "00"  # SHA256, a binary document signature
    out = subprocess.run(["gpgv", "--keyring", str(keyring), "--output", "-", str(tmp_path / "msg.gpg")],
                         capture_output=True, check=True)
    assert out.stdout == data  # the literal data is the payload
    packets = gpg(verify_home, "--list-packets", str(tmp_path / "msg.gpg")).stdout.decode()
    assert ":onepass_sig packet:" in packets and ":literal data packet:" in packets
    with pytest.raises(subprocess.CalledProcessError):  # a detached signature would verify against data
        gpg(verify_home, "--verify", str(tmp_path / "msg.gpg"), "/dev/null")
    subprocess.run(["gpgconf", "--homedir", str(verify_home), "--kill", "all"], capture_output=True)


def test_keyring_takes_exactly_the_named_keys(w, tmp_path):
    both = armored(w.home, w.fpr) + gpg(w.other_home, "--export", w.other_fpr).stdout  # armor and binary
    assert consumer.keyring(both, [w.fpr]) == gpg(w.home, "--export", w.fpr).stdout
    assert consumer.keyring(both, [w.other_fpr.lower(), w.fpr]) == \
        gpg(w.other_home, "--export", w.other_fpr).stdout + gpg(w.home, "--export", w.fpr).stdout
    with pytest.raises(UsageError, match="no public key"):
        consumer.keyring(armored(w.home, w.fpr), [w.other_fpr])
    with pytest.raises(UsageError, match="no online key"):
        consumer.keyring(armored(w.home, w.fpr), [])
    secret = gpg(w.home, "--armor", "--export-secret-keys", w.fpr).stdout
    for material in (secret, gpg(w.home, "--export-secret-keys", w.fpr).stdout):  # armored, binary
        with pytest.raises(UsageError, match="secret key"):
            consumer.keyring(armored(w.home, w.fpr) + material, [w.fpr])
    damaged = armored(w.home, w.fpr).replace(b"\n=", b"\n=A", 1)
    with pytest.raises(UsageError, match="oci keys"):
        consumer.keyring(damaged, [w.fpr])
    with pytest.raises(UsageError):
        consumer.write(tmp_path / "t", consumer.Setup("Bad Name", w.scope, "http://h/s", both, (w.fpr,)))
    assert not (tmp_path / "t").exists()  # nothing written when anything is refused


@pytest.mark.parametrize("url, ok", [
    ("https://templates.example.org/sigstore/", "https://templates.example.org/sigstore"),
    ("http://127.0.0.1:8080/repo/sigstore", "http://127.0.0.1:8080/repo/sigstore"),
    ("file:///srv/templates/sigstore", "file:///srv/templates/sigstore"),
    ("ftp://h/x", None), ("https://u:p@h/x", None), ("https://h/x?y=1", None), ("file://host/x", None),
    ("file:///", None), ('https://h/"x', None), ("https://h/a b", None), ("sigstore", None),
])
def test_lookaside_urls(url, ok):
    if ok:
        assert consumer.check_lookaside(url) == ok
    else:
        with pytest.raises(UsageError, match="oci lookaside"):
            consumer.check_lookaside(url)


def test_policy_variants_and_merge():
    strict = consumer.policy("reg.example.org/tmpl", "/etc/pki/tmplbuild.gpg", strict=True)
    assert strict["default"] == [{"type": "reject"}]
    existing = {"default": [{"type": "insecureAcceptAnything"}],
                "transports": {"docker-daemon": {"": [{"type": "insecureAcceptAnything"}]},
                               "docker": {"reg.example.org/tmpl": [{"type": "reject"}], "other.org": []}}}
    merged = consumer.merge_policy(existing, "reg.example.org/tmpl", "/k.gpg")
    assert merged["transports"]["docker"]["reg.example.org/tmpl"] == consumer.requirement("/k.gpg")
    assert merged["transports"]["docker"]["other.org"] == [] and "docker-daemon" in merged["transports"]
    assert existing["transports"]["docker"]["reg.example.org/tmpl"] == [{"type": "reject"}]  # not modified
    with pytest.raises(UsageError, match="absolute"):
        consumer.policy("reg.example.org/tmpl", "k.gpg")


def test_no_verification_gpg_agent_outlives_skopeo():
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "containers-ephemeral-gpg" not in ps
