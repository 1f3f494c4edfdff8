"""Mirror discovery from apt sources, and the debootstrap wrapper's refusals."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tmplbuild.builder.mirror import debian_mirror_from_host, resolve_mirror
from tmplbuild.builder.plan import WRAPPER
from tmplbuild.errors import UsageError

DEB822 = """Types: deb
URIs: http://mirror.example.invalid/debian-security
Suites: bookworm-security
Components: main

Types: deb-src
URIs: http://src.example.invalid/debian
Suites: bookworm

Types: deb
URIs: http://mirror.example.invalid/debian/
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""


def fake_root(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / "etc/apt" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


def test_deb822_picks_the_debian_archive_not_security_or_deb_src(tmp_path):
    root = fake_root(tmp_path, {"sources.list.d/debian.sources": DEB822})
    assert debian_mirror_from_host(root) == "http://mirror.example.invalid/debian"


def test_one_line_format_with_options(tmp_path):
    root = fake_root(tmp_path, {"sources.list": "# comment\ndeb [arch=amd64 signed-by=/k.gpg] "
                                                "http://one.example.invalid/debian trixie main\n"})
    assert debian_mirror_from_host(root) == "http://one.example.invalid/debian"


def test_disabled_files_and_third_party_suites_are_ignored(tmp_path):
    root = fake_root(tmp_path, {"sources.list.d/x.list.disabled": "deb http://a.example.invalid/debian bookworm main\n",
                                "sources.list.d/tool.list": "deb http://b.example.invalid/apt stable-tool main\n"})
    assert debian_mirror_from_host(root) is None


def test_precedence_flag_env_recipe_host(tmp_path, monkeypatch):
    root = fake_root(tmp_path, {"sources.list.d/debian.sources": DEB822})
    monkeypatch.delenv("TMPLBUILD_MIRROR", raising=False)
    assert resolve_mirror(None, None, root) == "http://mirror.example.invalid/debian"
    assert resolve_mirror(None, "http://recipe.example.invalid/d", root) == "http://recipe.example.invalid/d"
    monkeypatch.setenv("TMPLBUILD_MIRROR", "http://env.example.invalid/d/")
    assert resolve_mirror(None, "http://recipe.example.invalid/d", root) == "http://env.example.invalid/d"
    assert resolve_mirror("file:///srv/m", None, root) == "file:///srv/m"


def test_no_mirror_says_how_to_set_one(tmp_path, monkeypatch):
    monkeypatch.delenv("TMPLBUILD_MIRROR", raising=False)
    with pytest.raises(UsageError, match="TMPLBUILD_MIRROR"):
        resolve_mirror(None, None, tmp_path)


@pytest.mark.parametrize("bad", ["ftp://x.example.invalid/debian", "http://a b/debian", "http://x/$(reboot)"])
def test_malformed_mirror_is_a_usage_error_naming_its_source(tmp_path, monkeypatch, bad):
    monkeypatch.setenv("TMPLBUILD_MIRROR", bad)
    with pytest.raises(UsageError, match="TMPLBUILD_MIRROR"):
        resolve_mirror(None, None, tmp_path)


@pytest.mark.parametrize("argv, message", [
    (["bookworm", "/nonexistent", "http://m.example.invalid/debian"], "without --keyring"),
    (["--keyring=/k.gpg", "--no-check-gpg", "bookworm", "/x", "http://m.example.invalid/d"], "refusing --no-check-gpg"),
])
def test_wrapper_refuses_unverified_bootstraps(argv, message):
    proc = subprocess.run(["sh", str(WRAPPER), *argv], capture_output=True, text=True)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_security_mirror_comes_from_the_security_entry(tmp_path, monkeypatch):
    from tmplbuild.builder.mirror import security_mirror_from_host

    monkeypatch.delenv("TMPLBUILD_SECURITY_MIRROR", raising=False)
    root = fake_root(tmp_path, {"sources.list.d/debian.sources": DEB822})
    assert security_mirror_from_host(root) == "http://mirror.example.invalid/debian-security"
    assert resolve_mirror(None, None, root, security=True) == "http://mirror.example.invalid/debian-security"
    monkeypatch.setenv("TMPLBUILD_SECURITY_MIRROR", "http://sec.example.invalid/ds")
    assert resolve_mirror(None, None, root, security=True) == "http://sec.example.invalid/ds"


def test_no_security_mirror_says_how_to_set_one(tmp_path, monkeypatch):
    monkeypatch.delenv("TMPLBUILD_SECURITY_MIRROR", raising=False)
    with pytest.raises(UsageError, match="TMPLBUILD_SECURITY_MIRROR"):
        resolve_mirror(None, None, tmp_path, security=True)


def test_template_sources_default_to_the_hosts_mirror_not_the_build_mirror(tmp_path, monkeypatch):
    from tmplbuild.builder.mirror import template_mirror

    root = fake_root(tmp_path, {"sources.list.d/debian.sources": DEB822})
    monkeypatch.setenv("TMPLBUILD_MIRROR", "http://127.0.0.1:3142/debian")  # a local cache the build goes through
    assert template_mirror(None, root) == "http://mirror.example.invalid/debian"
    assert template_mirror("http://recipe.example.invalid/d", root) == "http://recipe.example.invalid/d"


@pytest.mark.parametrize("line", ["deb http://localhost:3142/debian bookworm main",
                                  "deb file:///srv/mirror bookworm main",
                                  "deb http://cache.example.invalid:3142/debian bookworm main"])
def test_a_host_mirror_no_container_can_use_is_refused_with_how_to_set_one(tmp_path, line):
    from tmplbuild.builder.mirror import template_mirror

    root = fake_root(tmp_path, {"sources.list": line + "\n"})
    with pytest.raises(UsageError) as err:
        template_mirror(None, root)
    assert err.value.check == "sources" and "host apt sources" in str(err.value)
    assert "set sources.mirror in the recipe" in str(err.value)


def test_the_hosts_apt_proxy_is_not_a_template_source(tmp_path, monkeypatch):
    from tmplbuild.builder.mirror import template_mirror

    monkeypatch.setenv("http_proxy", "http://proxy.example.invalid:8080/")
    with pytest.raises(UsageError, match="the proxy this host's apt uses"):
        template_mirror("http://proxy.example.invalid:8080/debian", tmp_path)
