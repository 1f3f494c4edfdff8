"""Recipe loading: the shipped recipes, merge rules, and above all the file:line:field of every refusal."""
from __future__ import annotations

import base64
import shutil
from pathlib import Path

import tomllib

import pytest

from tests.conftest import recipe_dir as shipped_recipe_dir
from tmplbuild.errors import RecipeError, UsageError
from tmplbuild.recipe import Compression, Recipe, Stage, load_recipe
from tmplbuild.recipe.locate import Locator
from tmplbuild.recipe.validate import package_name_problem, suite_problem, url_problem

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
needs_debian_keyring = pytest.mark.skipif(not DEBIAN_KEYRING.is_file(), reason="debian-archive-keyring not installed")

# Line numbers below are counted in this text; keep it stable.
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

[packages]
include = ["systemd-sysv", "iproute2"]
"""


def packet(body: bytes, tag: int = 6) -> bytes:
    """One old-format OpenPGP packet (a public key by default): the loader reads packet headers, not keys."""
    return bytes([0x80 | tag << 2, len(body)]) + body


PUBLIC_KEY = (b"-----BEGIN PGP PUBLIC KEY BLOCK-----\n\n" + base64.b64encode(packet(b"public"))
              + b"\n=abcd\n-----END PGP PUBLIC KEY BLOCK-----\n")
PRIVATE_KEY = b"-----BEGIN PGP PRIVATE KEY BLOCK-----\n\nlQdGBGSecret\n-----END PGP PRIVATE KEY BLOCK-----\n"
REPO = """
[[repositories]]
name = "extra"
uris = ["https://repo.example/debian"]
suites = ["bookworm"]
key = "repo.asc"
"""
SCRIPT = """
[[scripts]]
stage = "post-install"
run = "true"
"""


def sub(old: str, new: str, text: str = BASE) -> str:
    assert old in text, old  # a typo in a case must fail loudly, not test the unchanged BASE
    return text.replace(old, new, 1)


def write_tree(root: Path, files: dict[str, str | bytes]) -> None:
    defaults: dict[str, str | bytes] = {"keyring.gpg": packet(b"keyring"), "repo.asc": PUBLIC_KEY}
    for name, content in {**defaults, **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())


def load(root: Path, files: dict[str, str | bytes], name: str = "r.toml") -> Recipe:
    write_tree(root, files)
    return load_recipe(root / name)


# ---------------------------------------------------------------------------------------------------------
# Shipped recipes


@needs_debian_keyring
@pytest.mark.parametrize("name", ["debian-12-minimal", "debian-12-ssh", "debian-12-standard", "debian-13-minimal"])
def test_shipped_recipes_load(name: str) -> None:
    recipe = load_recipe(RECIPES / f"{name}.toml")
    assert recipe.name == name
    assert recipe.path == (RECIPES / f"{name}.toml").resolve()
    assert recipe.bootstrap.keyring == DEBIAN_KEYRING.resolve()
    # Proxmox and LXC read zstd; lxc-create -t local and systemd 252 only xz; Proxmox VE 9.1, lxc-oci and
    # registries an OCI image.
    assert recipe.formats == (Compression.ZSTD, Compression.XZ, Compression.OCI)
    # A template's sources come from the host unless the recipe names them: never the build mirror.
    assert recipe.sources.mirror is None and recipe.bootstrap.mirror is None
    assert recipe.canonical.startswith(b"{")


@needs_debian_keyring
def test_ssh_recipe_inherits_minimal() -> None:
    minimal = load_recipe(RECIPES / "debian-12-minimal.toml")
    ssh = load_recipe(RECIPES / "debian-12-ssh.toml")
    assert ssh.name == "debian-12-ssh"
    assert ssh.extends == ("debian-12-minimal",)
    assert ssh.suite == "bookworm" and ssh.release == "12" and ssh.architectures == minimal.architectures == ("amd64", "arm64", "armhf")
    assert ssh.variant == "ssh"
    assert ssh.include == minimal.include + ("openssh-server",)
    assert [s.name for s in ssh.scripts] == ["container-network.sh", "ssh-regenerate-host-keys.sh"]
    assert ssh.scripts[0] == minimal.scripts[0]
    assert ssh.scripts[1].content == (RECIPES / "files/ssh-regenerate-host-keys.sh").read_bytes()
    assert ssh.files == minimal.files and ssh.files[0].mode == 0o644
    assert ssh.sources == minimal.sources
    assert ssh.canonical != minimal.canonical


# ---------------------------------------------------------------------------------------------------------
# Refusals: (id, files, expected file, line, field, message fragment). The loaded file is always r.toml.

INVALID = [
    ("bad-package", {"r.toml": sub('"iproute2"]', '"Foo_Bar"]')}, "r.toml", 14, "packages.include[1]",
     'found "Foo_Bar", expected a Debian package name (lowercase letters, digits and + - ., at least 2 characters)'),
    ("bad-package-multiline-array",
     {"r.toml": sub('include = ["systemd-sysv", "iproute2"]', 'include = [\n  "systemd-sysv",\n  # x\n  "x",\n]')},
     "r.toml", 17, "packages.include[1]", 'found "x", expected a Debian package name'),
    ("shell-in-package", {"r.toml": sub('"iproute2"]', '"$(reboot)"]')}, "r.toml", 14, "packages.include[1]",
     'found "$(reboot)"'),
    ("package-both-lists", {"r.toml": BASE + 'exclude = ["iproute2"]\n'}, "r.toml", 15, "packages.exclude[0]",
     'found "iproute2", also in packages.include[1]'),
    ("duplicate-package", {"r.toml": sub('"iproute2"]', '"iproute2", "iproute2"]')}, "r.toml", 14,
     "packages.include[2]", 'found "iproute2" twice (also at [1])'),
    ("unknown-template-field", {"r.toml": sub('name = "t1"\n', 'name = "t1"\nnmae = "t1"\n')}, "r.toml", 3,
     "template.nmae", "unknown field; expected one of: name, distribution,"),
    ("unknown-quoted-key", {"r.toml": sub('name = "t1"\n', 'name = "t1"\n"na\\nme" = 1\n')}, "r.toml", 3,
     'template."na\\nme"', "unknown field"),
    ("unknown-packages-field", {"r.toml": BASE + 'excludes = ["vim"]\n'}, "r.toml", 15, "packages.excludes",
     "unknown field"),
    ("unknown-subtable", {"r.toml": BASE + "\n[template.extra]\nx = 1\n"}, "r.toml", 16, "template.extra",
     "unknown field"),
    ("wrong-type-release", {"r.toml": sub('release = "12"', "release = 12")}, "r.toml", 4, "template.release",
     "found integer 12, expected a string"),
    ("wrong-type-architectures", {"r.toml": sub('["amd64"]', '"amd64"')}, "r.toml", 7, "template.architectures",
     'found string "amd64", expected an array of architectures'),
    ("wrong-type-table", {"r.toml": 'packages = "vim"\n' + BASE.split("[packages]")[0]}, "r.toml", 1,
     "packages", "found string \"vim\", expected a table"),
    ("bad-arch", {"r.toml": sub('["amd64"]', '["amd64", "amd65"]')}, "r.toml", 7, "template.architectures[1]",
     'found "amd65", expected one of: amd64, arm64,'),
    ("duplicate-arch", {"r.toml": sub('["amd64"]', '["amd64", "arm64", "amd64"]')}, "r.toml", 7,
     "template.architectures[2]", 'found "amd64" twice (also at [0]), expected each architecture once'),
    ("empty-arch", {"r.toml": sub('["amd64"]', "[]")}, "r.toml", 7, "template.architectures",
     "found an empty array, expected at least one architecture"),
    ("suite-space", {"r.toml": sub('"bookworm"', '"bookworm main"')}, "r.toml", 5, "template.suite",
     'found "bookworm main", expected a suite name'),
    ("suite-shell", {"r.toml": sub('"bookworm"', '"bookworm;reboot"')}, "r.toml", 5, "template.suite",
     'found "bookworm;reboot"'),
    ("name-underscore", {"r.toml": sub('"t1"', '"my_tmpl"')}, "r.toml", 2, "template.name", 'found "my_tmpl"'),
    ("description-newline", {"r.toml": sub('"Test template"', '"line one\\nline two"')}, "r.toml", 8,
     "template.description", 'found "line one\\nline two", expected a single line'),
    ("bad-format", {"r.toml": sub("description", 'formats = ["tar.gz"]\ndescription')}, "r.toml", 8,
     "template.formats[0]", 'found "tar.gz", expected one of: oci, tar.xz, tar.zst'),
    ("oci-without-a-tarball", {"r.toml": sub("description", 'formats = ["oci"]\ndescription')}, "r.toml", 8,
     "template.formats", "found only oci, expected tar.zst or tar.xz too"),
    ("missing-suite", {"r.toml": sub('suite = "bookworm"\n', "")}, "r.toml", 1, "template.suite",
     "missing required field"),
    ("missing-bootstrap", {"r.toml": sub('[bootstrap]\nkeyring = "keyring.gpg"\n', "")}, "r.toml", None,
     "bootstrap.keyring", "missing required field"),
    ("missing-keyring-file", {"r.toml": sub('"keyring.gpg"', '"keys/nope.gpg"')}, "r.toml", 11,
     "bootstrap.keyring", "keyring file not found: "),
    ("bad-bootstrap-variant", {"r.toml": sub("[bootstrap]\n", '[bootstrap]\nvariant = "tiny"\n')}, "r.toml", 11,
     "bootstrap.variant", 'found "tiny", expected one of: -, buildd, fakechroot, minbase'),
    ("mirror-ftp", {"r.toml": sub("[bootstrap]\n", '[bootstrap]\nmirror = "ftp://mirror.example.invalid/debian"\n')},
     "r.toml", 11, "bootstrap.mirror", 'found "ftp://mirror.example.invalid/debian", expected a URL starting with http://, https:// or file://'),
    ("mirror-space", {"r.toml": sub("[bootstrap]\n", '[bootstrap]\nmirror = "http://a b"\n')}, "r.toml", 11,
     "bootstrap.mirror", "expected a URL without whitespace"),
    ("mirror-credentials", {"r.toml": sub("[bootstrap]\n", '[bootstrap]\nmirror = "http://u:pw@h/debian"\n')},
     "r.toml", 11, "bootstrap.mirror", "expected a URL without credentials"),
    ("repo-uri-file", {"r.toml": BASE + REPO.replace("https://repo.example/debian", "file:///srv/repo")},
     "r.toml", 18, "repositories[0].uris[0]", 'found "file:///srv/repo", expected a URL starting with http:// or https://'),
    ("repo-missing-key", {"r.toml": BASE + REPO.replace('key = "repo.asc"\n', "")}, "r.toml", 16,
     "repositories[0].key", "missing required field"),
    ("repo-private-key", {"r.toml": BASE + REPO, "repo.asc": PRIVATE_KEY}, "r.toml", 20, "repositories[0].key",
     "found a PRIVATE key, expected a public key"),
    ("repo-secret-key-packet", {"r.toml": BASE + REPO, "repo.asc": packet(b"key") + packet(b"secret", tag=5)}, "r.toml", 20,
     "repositories[0].key", "found a secret key packet, expected public keys only"),
    ("repo-duplicate-name", {"r.toml": BASE + REPO + REPO}, "r.toml", 23, "repositories[1].name",
     'found "extra" twice (also in repositories[0])'),
    ("script-run-and-file", {"r.toml": BASE + SCRIPT + 'file = "s.sh"\n', "s.sh": "true\n"}, "r.toml", 16,
     "scripts[0]", "found both run and file, expected exactly one of them"),
    ("script-neither", {"r.toml": BASE + SCRIPT.replace('run = "true"\n', "")}, "r.toml", 16, "scripts[0]",
     "found neither run nor file"),
    ("script-bad-stage", {"r.toml": BASE + SCRIPT + SCRIPT.replace("post-install", "post-boot")}, "r.toml", 21,
     "scripts[1].stage", 'found "post-boot", expected one of: post-bootstrap, post-install, pre-pack'),
    ("script-missing-file", {"r.toml": BASE + SCRIPT.replace('run = "true"', 'file = "s.sh"')}, "r.toml", 18,
     "scripts[0].file", "script file not found: "),
    ("script-unknown-field", {"r.toml": BASE + SCRIPT + 'shell = "bash"\n'}, "r.toml", 19, "scripts[0].shell",
     "unknown field; expected one of: stage, run, file"),
    # A multi-line string holding header- and key-like lines must not fool the line locator.
    ("script-stage-after-multiline-run",
     {"r.toml": BASE + '\n[[scripts]]\nrun = """\n[[scripts]]\nstage = "x"\n"""\nstage = "bogus"\n'}, "r.toml", 21,
     "scripts[0].stage", 'found "bogus"'),
    ("inline-array-of-tables",
     {"r.toml": 'scripts = [\n  {stage = "pre-pack", run = "true"},\n  {stage = "later", run = "x"},\n]\n' + BASE},
     "r.toml", 3, "scripts[1].stage", 'found "later"'),
    ("file-dest-dotdot", {"r.toml": BASE + '\n[[files]]\ndest = "/etc/../shadow"\ncontent = "x"\n'}, "r.toml", 17,
     "files[0].dest", 'found "/etc/../shadow", expected a path without . or .. components'),
    ("file-dest-relative", {"r.toml": BASE + '\n[[files]]\ndest = "etc/motd"\ncontent = "x"\n'}, "r.toml", 17,
     "files[0].dest", "expected an absolute path"),
    ("file-bad-mode", {"r.toml": BASE + '\n[[files]]\ndest = "/etc/motd"\ncontent = "x"\nmode = "0999"\n'},
     "r.toml", 19, "files[0].mode", 'found "0999", expected a permission mode'),
    ("file-decimal-mode", {"r.toml": BASE + '\n[[files]]\ndest = "/etc/motd"\ncontent = "x"\nmode = 644\n'},
     "r.toml", 19, "files[0].mode", "found 644 (decimal, which is 0o1204)"),
    ("file-mode-too-big", {"r.toml": BASE + '\n[[files]]\ndest = "/etc/motd"\ncontent = "x"\nmode = 0o17777\n'},
     "r.toml", 19, "files[0].mode", "found 8191, expected a permission mode"),
    ("toml-syntax", {"r.toml": sub('name = "t1"', 'name = "t1')}, "r.toml", 2, "", "invalid TOML: "),
    ("extends-cycle", {"r.toml": 'extends = "b"\n' + BASE,
                       "b.toml": '# b\nextends = "r"\n' + sub('"t1"', '"t2"')},
     "b.toml", 2, "extends", "found an extends cycle: r -> b -> r"),
    ("extends-self", {"r.toml": 'extends = "r"\n' + BASE}, "r.toml", 1, "extends", "extends cycle: r -> r"),
    ("extends-missing-parent", {"r.toml": '\nextends = "nope"\n[template]\nname = "c"\n'}, "r.toml", 2, "extends",
     'found "nope", but no nope.toml in '),
    ("extends-bad-name", {"r.toml": 'extends = "../etc/x"\n[template]\nname = "c"\n'}, "r.toml", 1, "extends",
     'found "../etc/x", expected the name of a recipe on the search path'),
    ("child-without-name", {"r.toml": 'extends = "base"\n\n[template]\nvariant = "ssh"\n', "base.toml": BASE},
     "r.toml", 3, "template.name", "a recipe that extends another must set its own name"),
    ("child-without-template", {"r.toml": 'extends = "base"\n', "base.toml": BASE}, "r.toml", 1, "template.name",
     "must set its own name"),
    ("child-with-parent-name", {"r.toml": 'extends = "base"\n[template]\nname = "t1"\n', "base.toml": BASE},
     "r.toml", 3, "template.name", 'found "t1", the name of the recipe it extends'),
    # An inherited mistake is reported in the parent file, at the parent's line.
    ("error-in-parent", {"r.toml": 'extends = "base"\n[template]\nname = "c"\n',
                         "base.toml": sub('"iproute2"]', '"Bad"]')}, "base.toml", 14, "packages.include[1]",
     'found "Bad"'),
    ("extends-with-slash", {"r.toml": 'extends = "sub/base"\n[template]\nname = "c"\n'}, "r.toml", 1,
     "extends", 'found "sub/base", expected the name of a recipe'),
]


@pytest.mark.parametrize(("files", "where", "line", "field", "fragment"), [c[1:] for c in INVALID],
                         ids=[c[0] for c in INVALID])
def test_invalid_recipe(tmp_path: Path, files: dict[str, str | bytes], where: str, line: int | None, field: str,
                        fragment: str) -> None:
    with pytest.raises(RecipeError) as info:
        load(tmp_path, files)
    err = info.value
    assert (err.path, err.line, err.field) == (str(tmp_path / where), line, field), str(err)
    assert fragment in str(err)
    assert "\n" not in str(err) and "\r" not in str(err)
    assert isinstance(err, UsageError) and err.exit_code == 2
    location = f"{tmp_path / where}:{line}" if line else str(tmp_path / where)
    assert str(err).startswith(f"recipe {location}: {field + ': ' if field else ''}")


def test_locator() -> None:
    text = ('a = 1\r\n"b" = [\r\n  "x,]", \'y]\',\r\n  [1, 2],\r\n  { k = "v" },\r\n]\r\n[t]\r\n'
            'c.d = """\n[u]\ne = 1\n"""\nf = 0o2 # c\n[[arr]]\ng=1\n[[arr]]\ng=2\n')
    assert tomllib.loads(text)  # the locator only ever sees valid TOML
    locator = Locator(text)
    expected = {"a": 1, "b": 2, "b[0]": 3, "b[1]": 3, "b[2]": 4, "b[2][1]": 4, "b[3]": 5, "b[3].k": 5, "b[9]": 2,
                "t": 7, "t.c.d": 8, "t.f": 12, "u": None, "u.e": None, "arr[0].g": 14, "arr[1].g": 16,
                "arr[1].zzz": 15, "arr[2].g": None, "nothing": None}
    assert {field: locator.line(field) for field in expected} == expected
    assert locator.literal("t.f") == "0o2"


def test_unreadable_recipe(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "absent.toml")
    assert (info.value.line, info.value.field) == (None, "")
    assert str(info.value) == f"recipe {tmp_path / 'absent.toml'}: cannot read: No such file or directory"


def test_keyring_relative_to_the_file_that_sets_it(tmp_path: Path) -> None:
    """A parent's relative keyring resolves against the parent's directory, not the child's."""
    write_tree(tmp_path, {"base/base.toml": BASE, "base/keyring.gpg": packet(b"base")})
    (tmp_path / "base/r.toml").write_text('extends = "base"\n[template]\nname = "c"\n')
    assert load_recipe(tmp_path / "base/r.toml").bootstrap.keyring == (tmp_path / "base/keyring.gpg").resolve()


# ---------------------------------------------------------------------------------------------------------
# Merge rules and defaults


def test_defaults(tmp_path: Path) -> None:
    recipe = load(tmp_path, {"r.toml": BASE + '\n[[files]]\ndest = "//etc//motd/"\ncontent = "hi"\n'})
    assert recipe.formats == (Compression.ZSTD,) and recipe.version is None and recipe.extends == ()
    assert (recipe.bootstrap.variant, recipe.bootstrap.components, recipe.bootstrap.mirror) == ("minbase", ("main",),
                                                                                                None)
    assert recipe.files[0].dest == "/etc/motd" and recipe.files[0].mode == 0o644 and recipe.files[0].content == b"hi"
    assert recipe.exclude == () and recipe.repositories == () and recipe.scripts == ()


@pytest.mark.parametrize(("literal", "mode"), [('"0644"', 0o644), ('"755"', 0o755), ("0o600", 0o600), ("7", 7),
                                               ('"4755"', 0o4755)])
def test_file_modes(tmp_path: Path, literal: str, mode: int) -> None:
    recipe = load(tmp_path, {"r.toml": BASE + f'\n[[files]]\ndest = "/x"\ncontent = ""\nmode = {literal}\n'})
    assert recipe.files[0].mode == mode


def test_merge(tmp_path: Path) -> None:
    parent = BASE + 'exclude = ["nano"]\n' + REPO + SCRIPT + (
        '\n[[files]]\ndest = "/etc/a"\ncontent = "parent a"\n\n[[files]]\ndest = "/etc/b"\ncontent = "parent b"\n')
    child = """extends = "base"
[template]
name = "child"
suite = "trixie"
formats = ["tar.xz", "tar.zst"]
[bootstrap]
mirror = "http://mirror.example/debian"
[packages]
include = ["nano", "vim"]
exclude = ["iproute2"]
[[repositories]]
name = "extra"
uris = ["http://other.example/debian"]
suites = ["trixie"]
key = "bin.gpg"
[[scripts]]
stage = "post-bootstrap"
run = "echo first"
[[scripts]]
stage = "pre-pack"
file = "files/last.sh"
[[files]]
dest = "/etc/a"
source = "files/a"
mode = "0600"
"""
    recipe = load(tmp_path, {"base.toml": parent, "r.toml": child, "bin.gpg": packet(b"pub"),
                             "files/last.sh": "echo last\n", "files/a": "child a"})
    assert (recipe.name, recipe.suite, recipe.release, recipe.extends) == ("child", "trixie", "12", ("base",))
    assert recipe.formats == (Compression.XZ, Compression.ZSTD)
    assert recipe.bootstrap.mirror == "http://mirror.example/debian"
    assert recipe.bootstrap.keyring == (tmp_path / "keyring.gpg").resolve()
    assert recipe.include == ("systemd-sysv", "nano", "vim") and recipe.exclude == ("iproute2",)
    [repo] = recipe.repositories
    assert (repo.uris, repo.key, repo.key_armored) == (("http://other.example/debian",), packet(b"pub"), False)
    assert [(s.stage, s.name, s.content) for s in recipe.scripts] == [
        (Stage.POST_BOOTSTRAP, "child:inline-1", b"echo first"),
        (Stage.POST_INSTALL, "t1:inline-1", b"true"),
        (Stage.PRE_PACK, "last.sh", b"echo last\n"),
    ]
    assert [(f.dest, f.content, f.mode) for f in recipe.files] == [("/etc/a", b"child a", 0o600),
                                                                   ("/etc/b", b"parent b", 0o644)]
    assert recipe.scripts_for(Stage.PRE_PACK) == (recipe.scripts[2],)


def test_armored_repository_key(tmp_path: Path) -> None:
    recipe = load(tmp_path, {"r.toml": BASE + REPO, "repo.asc": b"\n  " + PUBLIC_KEY})
    assert recipe.repositories[0].key_armored is True
    assert recipe.repositories[0].components == ("main",) and recipe.repositories[0].packages == ()


# ---------------------------------------------------------------------------------------------------------
# Canonical bytes


def test_canonical_ignores_comments_whitespace_and_location(tmp_path: Path) -> None:
    files = {"base.toml": BASE + SCRIPT.replace('run = "true"', 'file = "s.sh"'), "s.sh": "echo hi\n",
             "r.toml": 'extends = "base"\n[template]\nname = "c"\n'}
    first = load(tmp_path / "one", files).canonical
    reformatted = {**files, "base.toml": "# comment\n" + files["base.toml"].replace(" = ", "   =   ") + "\n\n# end\n"}
    assert load(tmp_path / "two", reformatted).canonical == first
    shutil.move(tmp_path / "one", tmp_path / "moved")
    assert load_recipe(tmp_path / "moved/r.toml").canonical == first


@pytest.mark.parametrize(("name", "change"), [
    ("script-file", {"s.sh": "echo bye\n"}),
    ("parent-package", {"base.toml": sub('"iproute2"', '"iproute"') + SCRIPT.replace('run = "true"', 'file = "s.sh"')}),
    ("keyring-content", {"keyring.gpg": packet(b"other")}),
    ("child-suite", {"r.toml": 'extends = "base"\n[template]\nname = "c"\nsuite = "trixie"\n'}),
])
def test_canonical_changes_with_content(tmp_path: Path, name: str, change: dict[str, str | bytes]) -> None:
    files: dict[str, str | bytes] = {"base.toml": BASE + SCRIPT.replace('run = "true"', 'file = "s.sh"'),
                                     "s.sh": "echo hi\n", "r.toml": 'extends = "base"\n[template]\nname = "c"\n'}
    before = load(tmp_path / "a", files).canonical
    assert load(tmp_path / "b", {**files, **change}).canonical != before


# ---------------------------------------------------------------------------------------------------------
# Public grammar helpers, also used for CLI and environment values


@pytest.mark.parametrize(("value", "ok"), [
    ("http://mirror.example.invalid/debian", True), ("https://mirror.example:8443/debian/", True),
    ("file:///srv/mirror", True), ("http://[::1]:3142/debian", True), ("http://h/a%20b", True),
    ("ftp://mirror.example.invalid/debian", False), ("http://a b", False), ("http://u:p@host/", False),
    ("http://host/?q=1", False), ("http://host/#frag", False), ("http:///path", False), ("file://host/x", False),
    ('http://host/"x', False), ("http://host/$(reboot)", False), ("http://host/a;b", False), ("", False),
    ("mirror.example.invalid/debian", False), ("http://host:99999/", False), ("http://host/\x1b", False),
    ("http://-bad/", False), ("HTTP://host/", False), ("http://host/%zz", False),
])
def test_url_problem(value: str, ok: bool) -> None:
    problem = url_problem(value)
    assert (problem is None) is ok, problem
    if problem:
        assert problem.startswith("expected ")


def test_url_problem_schemes() -> None:
    assert url_problem("file:///srv", schemes=("http", "https")) == "expected a URL starting with http:// or https://"


@pytest.mark.parametrize(("value", "ok"), [("openssh-server", True), ("libstdc++6", True), ("g++-12", True),
                                           ("a", False), ("Foo", False), ("foo_bar", False), ("-x", False),
                                           ("vim;reboot", False), ("vim\n", False), ("", False)])
def test_package_name_problem(value: str, ok: bool) -> None:
    assert (package_name_problem(value) is None) is ok


@pytest.mark.parametrize(("value", "ok"), [("bookworm", True), ("bookworm-updates", True), ("a" * 64, True),
                                           ("a" * 65, False), ("bookworm main", False), ("Bookworm", False),
                                           ("bookworm/updates", False), ("x;y", False), ("bookworm\n", False)])
def test_suite_problem(value: str, ok: bool) -> None:
    assert (suite_problem(value) is None) is ok


def test_extra_suites_are_parsed_and_validated(tmp_path):
    from tmplbuild.errors import RecipeError
    from tmplbuild.recipe import load_recipe

    recipe = load_recipe(RECIPES / "debian-12-ssh.toml")
    assert recipe.bootstrap.extra_suites == ("bookworm-updates", "bookworm-security")  # inherited
    text = (RECIPES / "debian-13-minimal.toml").read_text().replace('"trixie-security"]', '"trixie security"]')
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    with pytest.raises(RecipeError) as err:
        load_recipe(bad)
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if "trixie security" in ln)
    assert (err.value.line, err.value.field) == (line, "bootstrap.extra_suites[1]")


@needs_debian_keyring
@pytest.mark.parametrize("url, problem", [
    ("http://127.0.0.1/debian", "loopback"),
    ("http://localhost:3142/debian", "loopback"),
    ("file:///srv/mirror", "not file:"),
    ("http://apt-cache.lan:3142/debian", "apt cache or proxy"),
    ("http://cache.example.org/deb.example.org/debian", "apt cache or proxy"),
    ("http://aptcache/debian", "fully qualified"),
])
def test_template_sources_refuse_what_containers_cannot_reach(tmp_path, url, problem):
    """What goes into the template's sources.list is checked where it is written: a build-host-only mirror
    would give every container a broken apt."""
    from tmplbuild.errors import RecipeError

    recipe = tmp_path / "r.toml"
    recipe.write_text(f'extends = "x"\n[template]\nname = "r"\n\n[sources]\nmirror = "{url}"\n')
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe)
    assert (err.value.line, err.value.field) == (6, "sources.mirror") and problem in str(err.value)


@needs_debian_keyring
def test_template_sources_are_their_own_setting(tmp_path):
    recipe_dir = shipped_recipe_dir(tmp_path)
    (recipe_dir / "debian-12-minimal.toml").write_text((RECIPES / "debian-12-minimal.toml").read_text())
    (recipe_dir / "mine.toml").write_text(
        'extends = "debian-12-minimal"\n[template]\nname = "mine"\n[sources]\n'
        'mirror = "http://mirror.example.org/debian/"\nsecurity_mirror = "https://security.example.org/debian-security"\n')
    mine = load_recipe(recipe_dir / "mine.toml")
    assert mine.sources.mirror == "http://mirror.example.org/debian"
    assert mine.sources.security_mirror == "https://security.example.org/debian-security"
    assert mine.bootstrap.mirror is None
    assert mine.canonical != load_recipe(recipe_dir / "debian-12-minimal.toml").canonical
