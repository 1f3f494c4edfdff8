"""`tmplbuild check`: every error of a recipe in one run, one line each (file:line: field) in file and line order;
and, with --resolve, the recipe's packages resolved against the signed archive index without building, naming
each one the archive lacks at the entry that lists it.

The --resolve tests run against a local archive (file://, signed by a throwaway key) and, marked `build`, against
the Debian mirror of the host's apt sources, as the builder finds it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, recipe_dir, signed_suite
from tmplbuild.cli import main
from tmplbuild.errors import RecipeError, UsageError
from tmplbuild.recipe.load import RecipeErrors, load_recipe

KEYRING = bytes([0x80 | 6 << 2, 6]) + b"public"  # one OpenPGP public-key packet: the loader reads headers only

BASE = """\
[template]
name = "base"
distribution = "debian"
release = "12"
suite = "bookworm"
variant = "minimal"
architectures = ["amd64"]
description = "Test template"
colour = "blue"

[bootstrap]
keyring = "keyring.gpg"

[packages]
include = ["systemd-sysv", "Iproute2"]
"""
CHILD = """\
extends = "base"

[template]
name = "child"
architectures = ["amd64", "sparc"]
"""


def write(directory: Path, files: dict[str, str | bytes]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (directory / name).write_bytes(content if isinstance(content, bytes) else content.encode())


def check(capsys, *args: str) -> tuple[int, str, str]:
    """`tmplbuild check ARGS` through the CLI's own entry point: exit code, stdout, stderr."""
    code = main(["check", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_three_mistakes_in_two_files_take_one_run(tmp_path: Path, capsys):
    write(tmp_path, {"keyring.gpg": KEYRING, "base.toml": BASE, "child.toml": CHILD})
    code, out, err = check(capsys, str(tmp_path / "child.toml"))
    assert code == 2 and out == ""
    base, child = tmp_path / "base.toml", tmp_path / "child.toml"
    assert err.splitlines() == [
        f"tmplbuild: recipe {base}:9: template.colour: unknown field; expected one of: name, distribution, release,"
        " suite, variant, architectures, description, formats, version",
        f'tmplbuild: recipe {base}:15: packages.include[1]: found "Iproute2", expected a Debian package name'
        " (lowercase letters, digits and + - ., at least 2 characters)",
        f'tmplbuild: recipe {child}:5: template.architectures[1]: found "sparc", expected one of: amd64, arm64,'
        " armel, armhf, i386, mips64el, mipsel, ppc64el, riscv64, s390x",
    ]


def test_the_real_cli_exits_2_with_every_line(tmp_path: Path):
    write(tmp_path, {"keyring.gpg": KEYRING, "base.toml": BASE, "child.toml": CHILD})
    proc = subprocess.run([sys.executable, "-m", "tmplbuild", "check", str(tmp_path / "child.toml")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 3 and all(line.startswith("tmplbuild: recipe ") for line in lines), proc.stderr


def test_load_recipe_still_raises_the_first_error_and_collects_on_request(tmp_path: Path):
    """The builder's load_recipe(path) stops at the first error met (the leaf is read first);
    all_errors=True gives them all, ordered, in a RecipeErrors that is itself a RecipeError (the first line)."""
    write(tmp_path, {"keyring.gpg": KEYRING, "base.toml": BASE, "child.toml": CHILD})
    with pytest.raises(RecipeError) as first:
        load_recipe(tmp_path / "child.toml")
    assert not isinstance(first.value, RecipeErrors)
    assert (first.value.path, first.value.line, first.value.field) == \
        (str(tmp_path / "child.toml"), 5, "template.architectures[1]")
    with pytest.raises(RecipeErrors) as every:
        load_recipe(tmp_path / "child.toml", all_errors=True)
    assert [(Path(e.path).name, e.line, e.field) for e in every.value.errors] == [
        ("base.toml", 9, "template.colour"), ("base.toml", 15, "packages.include[1]"),
        ("child.toml", 5, "template.architectures[1]")]
    assert str(every.value) == str(every.value.errors[0]) and every.value.exit_code == 2


def test_a_clean_recipe_still_prints_ok(tmp_path: Path, capsys):
    write(tmp_path, {"keyring.gpg": KEYRING, "base.toml": BASE.replace('colour = "blue"\n', "")
                     .replace("Iproute2", "iproute2"), "child.toml": CHILD.replace(', "sparc"', "")})
    code, out, err = check(capsys, str(tmp_path / "child.toml"))
    assert (code, err) == (0, "")
    assert out == f"{(tmp_path / 'child.toml').resolve()}: ok (child, bookworm, amd64)\n"


def test_a_refused_value_is_not_also_reported_missing(tmp_path: Path, capsys):
    """A required field set to a wrong value is named once, for its value: not again as "missing"."""
    text = BASE.replace('colour = "blue"\n', "").replace('name = "base"', 'name = "Base_1"').replace(
        'description = "Test template"', "description = 42").replace('keyring = "keyring.gpg"', 'keyring = "none.gpg"')
    write(tmp_path, {"r.toml": text})
    code, _, err = check(capsys, str(tmp_path / "r.toml"))
    assert code == 2
    assert [line.split(": ")[2] for line in err.splitlines()] == [
        "template.name", "template.description", "bootstrap.keyring", "packages.include[1]"]
    assert "missing" not in err


def test_every_missing_required_field_and_every_bad_entry(tmp_path: Path, capsys):
    text = ('[template]\nname = "t"\n\n[[files]]\ndest = "relative"\ncontent = "x"\n\n[[files]]\ndest = "/etc/x"\n'
            'content = "x"\nmode = 644\n\n[[scripts]]\nstage = "later"\n')
    write(tmp_path, {"r.toml": text})
    code, _, err = check(capsys, str(tmp_path / "r.toml"))
    assert code == 2
    fields = [line.split(": ")[2] for line in err.splitlines()]
    # File and line order: what has no line of its own (no [bootstrap] table) first.
    assert fields == ["bootstrap.keyring", "template.distribution", "template.release", "template.suite",
                      "template.variant", "template.architectures", "template.description", "files[0].dest",
                      "files[1].mode", "scripts[0]", "scripts[0].stage"], err
    assert err.splitlines()[0].startswith(f"tmplbuild: recipe {tmp_path / 'r.toml'}: bootstrap.keyring: missing")
    assert err.splitlines()[1].startswith(f"tmplbuild: recipe {tmp_path / 'r.toml'}:1: template.distribution: ")


def test_a_broken_parent_stops_its_file_and_the_chain_but_not_the_childs_errors(tmp_path: Path, capsys):
    """Invalid TOML leaves nothing to check in that file; what the child got wrong is still named, and nothing
    the parent might have set is reported missing."""
    write(tmp_path, {"keyring.gpg": KEYRING, "base.toml": BASE + "[broken\n", "child.toml": CHILD})
    code, _, err = check(capsys, str(tmp_path / "child.toml"))
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 2, err
    assert lines[0].startswith(f"tmplbuild: recipe {tmp_path / 'base.toml'}:16: invalid TOML: ")
    assert lines[1].startswith(f"tmplbuild: recipe {tmp_path / 'child.toml'}:5: template.architectures[1]: ")


def test_several_recipes_each_get_their_lines(tmp_path: Path, capsys):
    good = BASE.replace('colour = "blue"\n', "").replace("Iproute2", "iproute2")
    write(tmp_path, {"keyring.gpg": KEYRING, "base.toml": good, "bad.toml": good.replace("bookworm", "Bookworm")
                     .replace('"systemd-sysv"', '"Systemd"').replace('name = "base"', 'name = "bad"')})
    code, out, err = check(capsys, str(tmp_path / "bad.toml"), str(tmp_path / "base.toml"))
    assert code == 2
    assert out == f"{(tmp_path / 'base.toml').resolve()}: ok (base, bookworm, amd64)\n"
    assert [line.split(": ")[2] for line in err.splitlines()] == ["template.suite", "packages.include[0]"]


def test_resolve_options_need_resolve(tmp_path: Path, capsys):
    write(tmp_path, {"keyring.gpg": KEYRING, "base.toml": BASE})
    with pytest.raises(UsageError, match="--arch, --cache-dir: only with --resolve"):
        from tmplbuild.cli import cmd_recipe_check, parser

        cmd_recipe_check(parser().parse_args(["check", str(tmp_path / "base.toml"), "--arch", "amd64",
                                              "--cache-dir", str(tmp_path)]))


# -- --resolve against a local signed archive ---------------------------------------------------------------------

def stanza(name: str, priority: str, depends: str = "") -> str:
    return (f"Package: {name}\nVersion: 1.0\nArchitecture: amd64\nPriority: {priority}\n"
            + (f"Depends: {depends}\n" if depends else "")
            + f"Filename: pool/{name}_1.0_amd64.deb\nSize: 1000\nSHA256: {'0' * 64}\n\n")


def local_archive(root: Path, home: Path) -> str:
    """dists/test/{InRelease,main/binary-amd64/Packages}, clearsigned by the throwaway key: base-files (required),
    apt (important) and nginx. Returns its file:// URL."""
    signed_suite(root, home, (stanza("base-files", "required") + stanza("apt", "important", "base-files")
                              + stanza("nginx", "optional", "base-files")).encode())
    return f"file://{root}"


LOCAL = """\
[template]
name = "local"
distribution = "debian"
release = "1"
suite = "test"
variant = "minimal"
architectures = ["amd64", "arm64"]
description = "Test template"

[bootstrap]
keyring = "pub.gpg"

[sources]
mirror = "http://mirror.example.invalid/debian"

[packages]
include = ["nginx", "nginx-lite"]
"""
LOCAL_CHILD = """\
extends = "local"

[template]
name = "local-child"

[packages]
include = ["nginx-extras"]
"""


@pytest.fixture
def local(tmp_path: Path, throwaway_key, monkeypatch) -> tuple[Path, str]:
    """(recipe directory, archive URL); the build mirror only from --mirror."""
    home, _, keyring = throwaway_key
    for name in ("TMPLBUILD_MIRROR", "TMPLBUILD_SECURITY_MIRROR", "SOURCE_DATE_EPOCH"):
        monkeypatch.delenv(name, raising=False)
    recipes = tmp_path / "recipes"
    write(recipes, {"pub.gpg": keyring.read_bytes(), "local.toml": LOCAL, "local-child.toml": LOCAL_CHILD})
    return recipes, local_archive(tmp_path / "archive", home)


def test_resolve_names_each_missing_package_at_the_entry_of_the_file_that_lists_it(tmp_path, local, capsys):
    recipes, url = local
    cache = tmp_path / "cache"
    code, out, err = check(capsys, "-q", str(recipes / "local-child.toml"), "--resolve", "--mirror", url,
                           "--cache-dir", str(cache), "--arch", "amd64")
    assert code == 2 and out == ""
    assert err.splitlines() == [
        f'tmplbuild: recipe {recipes / "local-child.toml"}:7: packages.include[0]: found "nginx-extras", not in test'
        " (main) for amd64",
        f'tmplbuild: recipe {recipes / "local.toml"}:17: packages.include[1]: found "nginx-lite", not in test'
        " (main) for amd64",
    ]
    # Nothing was built: the verified index is all it wrote.
    assert [p.relative_to(cache).parts[0] for p in cache.rglob("*") if p.is_file()] == ["indices"]


def test_resolve_counts_the_plan_of_a_recipe_the_archive_satisfies(tmp_path, local, capsys):
    recipes, url = local
    (recipes / "local.toml").write_text(LOCAL.replace(', "nginx-lite"', ""))
    code, out, err = check(capsys, "-q", str(recipes / "local.toml"), "--resolve", "--mirror", url,
                           "--cache-dir", str(tmp_path / "cache"), "--arch", "amd64")
    assert (code, err) == (0, "")
    assert out == (f"{(recipes / 'local.toml').resolve()}: ok (local, test, amd64, arm64), 3 packages resolved for"
                   " amd64 in test\n")


def test_resolve_refuses_an_architecture_the_recipe_does_not_list(tmp_path, local, capsys):
    recipes, url = local
    code, _, err = check(capsys, str(recipes / "local.toml"), "--resolve", "--mirror", url,
                         "--cache-dir", str(tmp_path / "cache"), "--arch", "riscv64")
    assert code == 2 and "riscv64 is not among the recipe's architectures (amd64, arm64)" in err
    assert not (tmp_path / "cache").exists()


def test_resolve_refuses_an_index_signed_by_another_key(tmp_path, local, capsys):
    recipes, url = local
    (recipes / "pub.gpg").write_bytes(KEYRING)
    code, _, err = check(capsys, str(recipes / "local.toml"), "--resolve", "--mirror", url,
                         "--cache-dir", str(tmp_path / "cache"), "--arch", "amd64")
    assert code == 3 and "archive signature" in err


# -- --resolve against the Debian mirror --------------------------------------------------------------------------

def _no_mirror() -> str | None:
    """Why the Debian mirror cannot be reached the way a build finds it, or None."""
    from tmplbuild.builder.mirror import resolve_mirror

    if not Path("/usr/share/keyrings/debian-archive-keyring.gpg").is_file():
        return "debian-archive-keyring not installed"
    try:
        resolve_mirror(None, None)
        resolve_mirror(None, None, security=True)
    except UsageError as exc:
        return str(exc)
    return None


MINIMAL = (ROOT / "recipes/debian-12-minimal.toml").read_text()


def resolve(recipe: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    return subprocess.run([sys.executable, "-m", "tmplbuild", "-q", "check", str(recipe), "--resolve", "--arch",
                           "amd64", "--cache-dir", str(cache)], capture_output=True, text=True, cwd=ROOT, env=env)


@pytest.mark.build
@pytest.mark.skipif(_no_mirror() is not None, reason=str(_no_mirror()))
def test_resolve_names_a_misspelt_package_of_the_shipped_recipe(tmp_path: Path):
    text = MINIMAL.replace('"ca-certificates"]', '"ca-certificates", "nginx-lite"]')
    assert text != MINIMAL
    recipe = recipe_dir(tmp_path / "recipes") / "debian-12-minimal.toml"
    recipe.write_text(text)
    line = text[: text.index('"nginx-lite"')].count("\n") + 1
    cache = tmp_path / "cache"
    proc = resolve(recipe, cache)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr == (f'tmplbuild: recipe {recipe}:{line}: packages.include[10]: found "nginx-lite", not in'
                           " bookworm, bookworm-updates, bookworm-security (main) for amd64\n")
    assert {p.relative_to(cache).parts[0] for p in cache.rglob("*") if p.is_file()} == {"indices"}


@pytest.mark.build
@pytest.mark.skipif(_no_mirror() is not None, reason=str(_no_mirror()))
def test_resolve_passes_the_shipped_recipe(tmp_path: Path):
    proc = resolve(ROOT / "recipes/debian-12-minimal.toml", tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{ROOT / 'recipes/debian-12-minimal.toml'}: ok (debian-12-minimal, bookworm, ")
    assert " packages resolved for amd64 in bookworm, bookworm-updates, bookworm-security\n" in proc.stdout
