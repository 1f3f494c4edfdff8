"""What `tmplbuild check` refuses before any build: recipe inputs outside the recipe's directory, destinations on
kernel file systems, keyrings and keys that are not OpenPGP public keys, and TOML nested too deeply. Each refusal
is exit 2 and one line naming the file, line and field."""
from __future__ import annotations

import base64
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, gpg, recipe_dir
from tests.test_recipe import DEBIAN_KEYRING, needs_debian_keyring
from tmplbuild.cli import main
from tmplbuild.recipe.load import MAX_NESTING


BASE = """\
[template]
name = "t1"
distribution = "debian"
release = "12"
suite = "bookworm"
variant = "minimal"
architectures = ["amd64"]
description = "Test template"

[bootstrap]
keyring = "keyring.gpg"
"""


def packet(body: bytes, tag: int = 6) -> bytes:
    """One old-format OpenPGP packet (a public key by default)."""
    return bytes([0x80 | tag << 2, len(body)]) + body


def armored(data: bytes, kind: str = "PUBLIC") -> bytes:
    return (f"-----BEGIN PGP {kind} KEY BLOCK-----\n\n".encode() + base64.b64encode(data)
            + f"\n=abcd\n-----END PGP {kind} KEY BLOCK-----\n".encode())


PUBLIC = packet(b"public key") + packet(b"user id", tag=13)


def repo(key: str) -> str:
    return (f'\n[[repositories]]\nname = "extra"\nuris = ["https://repo.example/debian"]\nsuites = ["x"]\n'
            f'key = "{key}"\n')


def source(path: str, dest: str = "/etc/x") -> str:
    return f'\n[[files]]\ndest = "{dest}"\nsource = "{path}"\n'


def script(path: str) -> str:
    return f'\n[[scripts]]\nstage = "post-install"\nfile = "{path}"\n'


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """tmp/recipes/ holds the recipe and a valid keyring; tmp/outside/ holds files of the "host" beside it."""
    recipes, outside = tmp_path / "recipes", tmp_path / "outside"
    recipes.mkdir()
    outside.mkdir()
    (recipes / "keyring.gpg").write_bytes(PUBLIC)
    (outside / "secret.txt").write_text("root:$6$hash:19000:0:99999:7:::\n")
    (outside / "run.sh").write_text("#!/bin/sh\ntrue\n")
    (outside / "repo.asc").write_bytes(armored(PUBLIC))
    (outside / "keyring.gpg").write_bytes(PUBLIC)
    return recipes


def check(recipe: Path, capsys) -> tuple[int, str]:
    """`tmplbuild check RECIPE` through the CLI's own entry point: exit code and stderr."""
    code = main(["check", str(recipe)])
    return code, capsys.readouterr().err


def refused(recipe: Path, capsys, field: str, *phrases: str) -> str:
    code, err = check(recipe, capsys)
    assert code == 2, err
    line = err.strip()
    assert "\n" not in line, err
    assert line.startswith(f"tmplbuild: recipe {recipe}:") and f": {field}: " in line, line
    for phrase in phrases:
        assert phrase in line, line
    return line


def write(recipes: Path, text: str, name: str = "r.toml") -> Path:
    (recipes / name).write_text(text)
    return recipes / name


# ---------------------------------------------------------------------------------------------------------
# 1. Recipe inputs stay inside the recipe's directory


@pytest.mark.parametrize("text, field, shown", [
    (BASE + source("../outside/secret.txt"), "files[0].source", '"../outside/secret.txt"'),
    (BASE + source("files/../../outside/secret.txt"), "files[0].source", '"files/../../outside/secret.txt"'),
    (BASE + source("/etc/passwd"), "files[0].source", '"/etc/passwd"'),
    (BASE + script("../outside/run.sh"), "scripts[0].file", '"../outside/run.sh"'),
    (BASE + script("/etc/passwd"), "scripts[0].file", '"/etc/passwd"'),
    (BASE + repo("../outside/repo.asc"), "repositories[0].key", '"../outside/repo.asc"'),
    (BASE.replace('"keyring.gpg"', '"../outside/keyring.gpg"'), "bootstrap.keyring", '"../outside/keyring.gpg"'),
], ids=["source-dotdot", "source-dotdot-via-subdir", "source-absolute", "script-dotdot", "script-absolute",
        "repo-key-dotdot", "keyring-dotdot"])
def test_input_outside_the_recipe_directory_is_refused(tree: Path, capsys, text: str, field: str, shown: str):
    line = refused(write(tree, text), capsys, field, f"{shown} is outside the recipe's directory {tree.resolve()}")
    assert "root:$6$" not in line


def test_absolute_keyring_outside_the_system_keyrings_is_refused(tree: Path, capsys):
    keyring = tree.parent / "outside/keyring.gpg"
    refused(write(tree, BASE.replace('"keyring.gpg"', f'"{keyring}"')), capsys, "bootstrap.keyring",
            f'"{keyring}" is outside the recipe\'s directory', "or an absolute path into /usr/share/keyrings")


def test_keyring_escaping_the_system_keyrings_is_refused(tree: Path, capsys):
    refused(write(tree, BASE.replace('"keyring.gpg"', '"/usr/share/keyrings/../../../etc/passwd"')), capsys,
            "bootstrap.keyring", "is outside the recipe's directory")


@pytest.mark.parametrize("link, target, entry, field", [
    ("hosts", "outside/secret.txt", source, "files[0].source"),
    ("files", "outside", source, "files[0].source"),
    ("run.sh", "outside/run.sh", script, "scripts[0].file"),
    ("repo.asc", "outside/repo.asc", repo, "repositories[0].key"),
], ids=["file-symlink", "directory-symlink", "script-symlink", "repo-key-symlink"])
def test_symlink_out_of_the_recipe_directory_is_refused(tree: Path, capsys, link: str, target: str, entry, field: str):
    (tree / link).symlink_to(tree.parent / target)
    raw = "files/secret.txt" if link == "files" else link
    resolved = (tree.parent / target / ("secret.txt" if link == "files" else "")).resolve()
    refused(write(tree, BASE + entry(raw)), capsys, field,
            f'"{raw}" (resolving to {resolved}) is outside the recipe\'s directory {tree.resolve()}')


def test_keyring_symlink_out_of_the_recipe_directory_is_refused(tree: Path, capsys):
    (tree / "keyring.gpg").unlink()
    (tree / "keyring.gpg").symlink_to(tree.parent / "outside/keyring.gpg")
    refused(write(tree, BASE), capsys, "bootstrap.keyring", '"keyring.gpg" (resolving to', "is outside")


def test_parent_recipe_inputs_are_confined_and_reported_against_the_parent(tree: Path, capsys):
    write(tree, BASE + source("../outside/secret.txt"), "base.toml")
    child = write(tree, 'extends = "base"\n[template]\nname = "child"\n')
    code, err = check(child, capsys)
    assert code == 2
    assert err.strip().startswith(f"tmplbuild: recipe {tree / 'base.toml'}:15: files[0].source: ")
    assert "is outside the recipe's directory" in err


def test_parent_recipe_outside_the_recipe_directory_is_refused(tree: Path, capsys):
    (tree.parent / "outside/base.toml").write_text(BASE)
    (tree / "base.toml").symlink_to(tree.parent / "outside/base.toml")
    refused(write(tree, 'extends = "base"\n[template]\nname = "child"\n'), capsys, "extends",
            f"resolves to {(tree.parent / 'outside/base.toml').resolve()}, outside the directory {tree.resolve()} "
            "it was found in")


def test_parent_recipe_symlink_loop_is_refused(tree: Path, capsys):
    (tree / "base.toml").symlink_to(tree / "base.toml")
    refused(write(tree, 'extends = "base"\n[template]\nname = "child"\n'), capsys, "extends", "cannot be resolved")


def test_symlink_loop_is_refused(tree: Path, capsys):
    (tree / "loop").symlink_to(tree / "loop")
    refused(write(tree, BASE + source("loop")), capsys, "files[0].source", "cannot be resolved")


def test_paths_that_stay_inside_are_accepted(tree: Path, capsys):
    (tree / "files").mkdir()
    (tree / "files/hosts").write_text("127.0.0.1 localhost\n")
    (tree / "hosts-link").symlink_to("files/hosts")
    text = (BASE + source("files/../files/hosts", "/etc/a") + source("hosts-link", "/etc/b")
            + source(str(tree / "files/hosts"), "/etc/c"))
    code, err = check(write(tree, text), capsys)
    assert code == 0, err


@needs_debian_keyring
def test_system_keyring_and_shipped_recipes_are_accepted(tree: Path):
    (tree / "keyring.gpg").unlink()
    write(tree, BASE.replace('"keyring.gpg"', f'"{DEBIAN_KEYRING}"'))
    recipes = sorted(str(p) for p in (ROOT / "recipes").glob("*.toml"))
    proc = subprocess.run([sys.executable, "-m", "tmplbuild", "check", str(tree / "r.toml"), *recipes],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == len(recipes) + 1


def test_recipe_dir_helper_copies_the_shipped_files(tmp_path: Path):
    files = recipe_dir(tmp_path) / "files"
    assert files.is_dir() and not files.is_symlink()
    assert sorted(p.name for p in files.iterdir()) == sorted(p.name for p in (ROOT / "recipes/files").iterdir())


def test_real_cli_refuses_an_escaping_source(tree: Path):
    recipe = write(tree, BASE + source("../../../../../../../../etc/shadow"))
    proc = subprocess.run([sys.executable, "-m", "tmplbuild", "check", str(recipe)], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (f"tmplbuild: recipe {recipe}:15: files[0].source: \"../../../../../../../../etc/shadow\""
                           f" is outside the recipe's directory {tree.resolve()}; expected a path inside it\n")


# ---------------------------------------------------------------------------------------------------------
# 2. Destinations


@pytest.mark.parametrize("dest, expected", [
    ("/proc/sys/kernel/core_pattern", "a path outside /dev, /proc, /sys"),
    ("/sys/kernel/uevent_helper", "a path outside /dev, /proc, /sys"),
    ("/dev/sda", "a path outside /dev, /proc, /sys"),
    ("//dev//null", "a path outside /dev, /proc, /sys"),
    ("/proc", "a path outside /dev, /proc, /sys"),
    ("/etc/../proc/x", "a path without . or .. components"),
    ("/etc/../../etc/shadow", "a path without . or .. components"),
    ("etc/hosts", "an absolute path (starting with /)"),
    ("./etc/hosts", "an absolute path (starting with /)"),
])
def test_bad_destination_is_refused(tree: Path, capsys, dest: str, expected: str):
    refused(write(tree, BASE + f'\n[[files]]\ndest = "{dest}"\ncontent = "x"\n'), capsys, "files[0].dest",
            f'found "{dest}", expected {expected}')


def test_destination_merely_starting_like_a_kernel_fs_is_accepted(tree: Path, capsys):
    text = BASE + "".join(f'\n[[files]]\ndest = "{d}"\ncontent = "x"\n' for d in ("/devices", "/etc/proc", "/sysx"))
    code, err = check(write(tree, text), capsys)
    assert code == 0, err


# ---------------------------------------------------------------------------------------------------------
# 3. Keyrings and keys are OpenPGP public keys


@pytest.mark.parametrize("content, phrase", [
    (b"root:x:0:0:root:/root:/bin/bash\n", "are not whole OpenPGP packets"),
    (b"", "found an empty file"),
    (PUBLIC[:-3], "are not whole OpenPGP packets"),
    (armored(PUBLIC), "found an ASCII-armored key, expected a binary OpenPGP keyring"),
    (packet(b"secret key", tag=5), "found a secret key packet"),
    (PUBLIC + packet(b"secret subkey", tag=7), "found a secret key packet"),
    (armored(packet(b"secret key", tag=5), "PRIVATE"), "found a PRIVATE key"),
    (packet(b"user id", tag=13) + PUBLIC, "found OpenPGP packet type 13 first"),
    (b"\x00\x00\x00\x20\x01\x01\x00\x00KBXf" + bytes(20), "found a GnuPG keybox"),
], ids=["text", "empty", "truncated", "armored", "secret", "secret-subkey-appended", "armored-private", "no-key",
        "keybox"])
def test_keyring_that_is_not_an_openpgp_public_keyring_is_refused(tree: Path, capsys, content: bytes, phrase: str):
    (tree / "keyring.gpg").write_bytes(content)
    refused(write(tree, BASE), capsys, "bootstrap.keyring", f"in {tree / 'keyring.gpg'}: ", phrase)


@pytest.mark.parametrize("content, phrase", [
    (b"deb http://x y z\n", "are not whole OpenPGP packets"),
    (armored(PUBLIC + packet(b"secret subkey", tag=7)), "found a secret key packet"),
    (armored(b"\x00not base64 of packets"), "are not whole OpenPGP packets"),
    (PUBLIC + packet(b"secret key", tag=5), "found a secret key packet"),
], ids=["text", "secret-in-public-armor", "armored-garbage", "binary-secret-appended"])
def test_repository_key_that_is_not_an_openpgp_public_key_is_refused(tree: Path, capsys, content: bytes,
                                                                      phrase: str):
    (tree / "repo.asc").write_bytes(content)
    refused(write(tree, BASE + repo("repo.asc")), capsys, "repositories[0].key", phrase)


def test_real_gpg_keys(tree: Path, capsys, throwaway_key, tmp_path: Path, monkeypatch):
    """A real exported public key passes, armored or binary (armored only as a repository key); the secret key
    is refused. The check runs no gpg: it leaves GNUPGHOME alone, even where none exists."""
    home, fpr, keyring = throwaway_key
    (tree / "keyring.gpg").write_bytes(keyring.read_bytes())
    (tree / "repo.asc").write_bytes(gpg(home, "--armor", "--export", fpr).stdout)
    unused_home = tmp_path / "no-gnupg-home"
    monkeypatch.setenv("GNUPGHOME", str(unused_home))
    assert check(write(tree, BASE + repo("repo.asc")), capsys)[0] == 0
    (tree / "repo.asc").write_bytes(gpg(home, "--export-secret-keys", fpr).stdout)
    refused(write(tree, BASE + repo("repo.asc")), capsys, "repositories[0].key", "found a secret key packet")
    (tree / "keyring.gpg").write_bytes(gpg(home, "--armor", "--export-secret-keys", fpr).stdout)
    refused(write(tree, BASE), capsys, "bootstrap.keyring", "found a PRIVATE key")
    assert not unused_home.exists()


# ---------------------------------------------------------------------------------------------------------
# 4. Nesting depth


@pytest.mark.parametrize("text, line, field", [
    ("x = " + "[" * 100_000 + "]" * 100_000 + "\n", 1, "x"),
    (BASE + "y = " + "{a = " * 100_000 + "1" + "}" * 100_000 + "\n", 12, "y"),
    (BASE + "z = [\n" + "[\n" * 100_000 + "]\n" * 100_000 + "]\n", 12 + MAX_NESTING, ""),
    (".".join(["a"] * 100_000) + " = 1\n", 1, ""),
    ("[" + ".".join(["a"] * 100_000) + "]\n", 1, ""),
], ids=["array", "inline-table", "multiline-array", "dotted-key", "dotted-header"])
def test_deep_nesting_is_a_recipe_error(tree: Path, text: str, line: int, field: str):
    """Through the real CLI: tomllib would end in RecursionError (exit 1), or in quadratic time and memory."""
    recipe = write(tree, text)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "tmplbuild", "check", str(recipe)], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert time.monotonic() - start < 20
    assert proc.returncode == 2, proc.stderr
    where = f"{recipe}:{line}: {field}: " if field else f"{recipe}:{line}: "
    assert proc.stderr == (f"tmplbuild: recipe {where}invalid TOML: nested too deeply, expected at most {MAX_NESTING}"
                           f" levels of arrays and inline tables and at most {MAX_NESTING} parts in a dotted key\n")


@pytest.mark.parametrize("extra, expected", [
    ("x = " + "[" * MAX_NESTING + "]" * MAX_NESTING + "\n", "x: unknown field"),
    (".".join(["x"] * MAX_NESTING) + " = 1\n", "x: unknown field"),
    ('y = "' + "[" * 1000 + '"\n', "y: unknown field"),
    ("y = '''\n" + "{[" * 1000 + "'''\n", "y: unknown field"),
    ('y = """\n' + "{[" * 1000 + '\\""""\n', "y: unknown field"),
    ("# " + "[" * 1000 + "\ny = 1\n", "y: unknown field"),
], ids=["array-at-limit", "dotted-key-at-limit", "brackets-in-string", "brackets-in-literal-string",
        "brackets-in-multiline-string", "brackets-in-comment"])
def test_nesting_up_to_the_limit_and_brackets_in_strings_pass_the_depth_check(tree: Path, capsys, extra: str,
                                                                                expected: str):
    code, err = check(write(tree, extra + BASE), capsys)
    assert code == 2 and expected in err and "nested too deeply" not in err, err


def test_brackets_in_recipe_strings_are_accepted(tree: Path, capsys):
    text = BASE.replace('"Test template"', '"' + "[" * 100 + '"') + (
        '\n[[scripts]]\nstage = "post-install"\nrun = """\n' + "[ -e /x ] && {\n" * 200 + "true\n" + '"""\n')
    code, err = check(write(tree, text), capsys)
    assert code == 0, err




def test_extends_finds_shipped_recipes_and_the_search_path_and_keeps_each_recipes_inputs_its_own(tree: Path, capsys,
                                                                                               monkeypatch, tmp_path):
    """A maintainer's recipe in its own directory extends a shipped one by name; $TMPLBUILD_RECIPE_PATH adds
    directories; the recipe's own directory comes first; inputs stay confined to each recipe's directory."""
    from tmplbuild.recipe import load_recipe
    from tmplbuild.recipe.load import SHIPPED

    child = write(tree, 'extends = "debian-12-minimal"\n[template]\nname = "mine"\n')
    recipe = load_recipe(child)
    assert recipe.name == "mine" and recipe.extends == ("debian-12-minimal",)
    assert recipe.suite == load_recipe(SHIPPED / "debian-12-minimal.toml").suite
    assert check(child, capsys)[0] == 0
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "house.toml").write_text('extends = "debian-12-minimal"\n[template]\nname = "house"\n'
                                       'description = "house base"\n')
    grandchild = write(tree, 'extends = "house"\n[template]\nname = "web"\n', "web.toml")
    missing = check(grandchild, capsys)
    assert missing[0] == 2 and f"no house.toml in {tree}, " in missing[1] and "TMPLBUILD_RECIPE_PATH" in missing[1]
    monkeypatch.setenv("TMPLBUILD_RECIPE_PATH", str(shared))
    web = load_recipe(grandchild)
    assert web.extends == ("house", "debian-12-minimal") and web.description == "house base"
    # The recipe's own directory wins over the search path and the shipped recipes.
    (tree / "house.toml").write_text('extends = "debian-12-minimal"\n[template]\nname = "house"\n'
                                     'description = "local house"\n')
    assert load_recipe(grandchild).description == "local house"
    # A recipe found on the search path has its inputs confined to its own directory.
    (tree / "house.toml").unlink()
    (shared / "house.toml").write_text('extends = "debian-12-minimal"\n[template]\nname = "house"\n'
                                       + source("../outside/secret.txt"))
    code, err = check(grandchild, capsys)
    assert code == 2 and f"{shared / 'house.toml'}" in err and "is outside the recipe's directory" in err
