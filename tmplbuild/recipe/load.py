"""Recipe loading: strict TOML parse of each file in the `extends` chain, merge, defaults, typed `Recipe`.

Every value is checked in the file that sets it, before merging, so an error names the file and line the user
must edit, even when the value is inherited. Only "required field missing" is decided after the merge (a child
may inherit it) and is reported against the recipe being loaded.

Script names: a file-backed script is named after its file (`ssh-regenerate-host-keys.sh`); an inline one is
`<template name of the recipe file that defines it>:inline-<N>`, N being the 1-based position of the script
among that file's `[[scripts]]` entries. The name is the same whichever recipe of the chain is loaded.
"""
from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tmplbuild.errors import RecipeError
from tmplbuild.recipe import validate as v
from tmplbuild.recipe.locate import Locator, Source, Val
from tmplbuild.recipe.model import (
    ARCHITECTURES, VARIANTS, AptRepository, Bootstrap, Compression, FileEntry, Recipe, Script, Sources, Stage,
)

_TOML_POSITION = re.compile(r"\s*\(at (?:line (\d+), column \d+|end of document)\)\Z")
_STAGE_ORDER = {stage: i for i, stage in enumerate(Stage)}


def _keyring(val: Val) -> tuple[Path, str]:
    path, data = v.read_input(val, "keyring", system_dir=v.SYSTEM_KEYRINGS)
    problem = v.key_problem(data, armor_ok=False)  # gpgv --keyring reads binary keyrings only
    if problem:
        raise val.error(f"in {path}: {problem}")
    return path.resolve(), hashlib.sha256(data).hexdigest()


def _formats(val: Val) -> tuple[Compression, ...]:
    formats = tuple(map(Compression, v.unique_list(val, v.one_of([c.value for c in Compression]), "format")))
    if not any(f.is_rootfs_tar for f in formats):
        # The OCI image is made from the same tar; a template's boot test and its plain-tar users need one.
        raise val.error(f"found only {', '.join(f.value for f in formats)}, expected tar.zst or tar.xz too")
    return formats


_TEMPLATE: dict[str, Callable[[Val], Any]] = {
    "name": v.grammar(v.NAME_RE, v.NAME_EXPECTED),
    "distribution": v.grammar(v.DISTRIBUTION_RE, v.NAME_EXPECTED),
    "release": v.grammar(v.RELEASE_RE, v.RELEASE_EXPECTED),
    "suite": v.grammar(v.SUITE_RE, v.SUITE_EXPECTED, v.SUITE_MAX_LENGTH),
    "variant": v.grammar(v.NAME_RE, v.NAME_EXPECTED),
    "architectures": lambda val: v.unique_list(val, v.one_of(ARCHITECTURES), "architecture"),
    "description": v.description,
    "formats": lambda val: _formats(val),
    "version": v.grammar(v.VERSION_RE, v.VERSION_EXPECTED),
}
_BOOTSTRAP: dict[str, Callable[[Val], Any]] = {
    "variant": v.one_of(VARIANTS),
    "components": lambda val: v.unique_list(val, v.grammar(v.COMPONENT_RE, v.COMPONENT_EXPECTED), "component"),
    "keyring": _keyring,
    "mirror": v.url(("http", "https", "file")),
    "extra_suites": lambda val: v.unique_list(val, v.grammar(v.SUITE_RE, v.SUITE_EXPECTED, v.SUITE_MAX_LENGTH),
                                              "suite", non_empty=False),
    "security_mirror": v.url(("http", "https", "file")),
}
_SOURCES: dict[str, Callable[[Val], Any]] = {
    "mirror": v.template_source_url,
    "security_mirror": v.template_source_url,
}
_REQUIRED = {  # field -> what is expected, for the "missing" message
    "template.name": v.NAME_EXPECTED, "template.distribution": v.NAME_EXPECTED,
    "template.release": v.RELEASE_EXPECTED, "template.suite": v.SUITE_EXPECTED,
    "template.variant": v.NAME_EXPECTED, "template.architectures": "an array of architectures",
    "template.description": v.DESCRIPTION_EXPECTED,
    "bootstrap.keyring": "the path of the archive keyring file (binary OpenPGP)",
}
_packages = v.grammar(v.PACKAGE_RE, v.PACKAGE_EXPECTED)


@dataclass
class _Layer:
    """One recipe file, parsed and checked, not yet merged with its parents."""

    src: Source
    extends: Val | None = None
    template: dict[str, Any] = field(default_factory=dict)
    bootstrap: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, Any] = field(default_factory=dict)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    repositories: list[AptRepository] = field(default_factory=list)
    scripts: list[Script] = field(default_factory=list)
    files: list[FileEntry] = field(default_factory=list)


def load_recipe(path: Path | str) -> Recipe:
    """Load, merge (`extends`) and validate a recipe, reading every file it names.

    Raises RecipeError (naming file, line and field) for unreadable or invalid TOML, unknown fields, wrong
    types, values outside their grammar, missing or unreadable files, and `extends` cycles.
    """
    layers = _load_chain(Path(path))  # root first
    merged = _merge(layers)
    leaf = layers[-1]
    for name, expected in _REQUIRED.items():
        table, key = name.split(".")
        if key not in merged[table]:
            raise leaf.src.error(name, f"missing required field, expected {expected}")
    t, b, s = merged["template"], merged["bootstrap"], merged["sources"]
    keyring, keyring_sha256 = b["keyring"]
    recipe = Recipe(
        path=leaf.src.path.resolve(), name=t["name"], distribution=t["distribution"], release=t["release"],
        suite=t["suite"], variant=t["variant"], architectures=t["architectures"], description=t["description"],
        bootstrap=Bootstrap(variant=b.get("variant", "minbase"), components=b.get("components", ("main",)),
                            keyring=keyring, mirror=b.get("mirror"), extra_suites=b.get("extra_suites", ()),
                            security_mirror=b.get("security_mirror")),
        include=merged["include"], exclude=merged["exclude"], repositories=merged["repositories"],
        scripts=merged["scripts"], files=merged["files"], formats=t.get("formats", (Compression.ZSTD,)),
        version=t.get("version"), sources=Sources(mirror=s.get("mirror"), security_mirror=s.get("security_mirror")),
        extends=tuple(layer.extends.value for layer in reversed(layers) if layer.extends is not None),
    )
    return dataclasses.replace(recipe, canonical=_canonical(recipe, {keyring: keyring_sha256}))


def _load_chain(path: Path) -> list[_Layer]:
    chain: list[_Layer] = []  # leaf first while loading
    seen: list[Path] = []
    via: Val | None = None  # the `extends` that led to `path`
    while True:
        try:
            resolved = path.resolve()
        except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop
            if via is None:
                raise RecipeError(str(path), None, "", f"cannot read: {e}") from e
            raise via.error(f"found {v.quote(via.value)}, but {path} cannot be resolved ({e})") from e
        if via is not None:
            if resolved in seen:
                names = " -> ".join([p.stem for p in seen] + [resolved.stem])
                raise via.error(f"found an extends cycle: {names}")
            if not resolved.is_relative_to(path.parent.resolve()):  # its text and inputs go into the template too
                raise via.error(f"found {v.quote(via.value)}, but {path} resolves to {resolved}, outside the"
                                f" directory {path.parent.resolve()} it was found in; expected a recipe there")
        layer = _parse_layer(*_read(path))
        name = layer.template.get("name")
        if name is None:
            if layer.extends is None:
                raise layer.src.error("template.name", f"missing required field, expected {v.NAME_EXPECTED}")
            line = layer.src.locator.line("template") or layer.src.locator.line("extends")
            raise layer.src.error("template.name", "missing; a recipe that extends another must set its own name,"
                                  " else its template would overwrite the parent's", line)
        for child in chain:
            if child.template["name"] == name:
                raise child.src.error("template.name", f"found {v.quote(name)}, the name of the recipe it extends"
                                      f" ({path}), expected a name of its own")
        chain.append(layer)
        seen.append(resolved)
        if layer.extends is None:
            return chain[::-1]
        via = layer.extends
        path = _parent(via)


SEARCH_PATH_ENV = "TMPLBUILD_RECIPE_PATH"
SHIPPED = Path(__file__).resolve().parent.parent.parent / "recipes"  # the checkout's (or install's) recipes/


def search_path(own: Path) -> list[Path]:
    """Where `extends = "NAME"` looks for NAME.toml, in order: the recipe's own directory, each directory of
    $TMPLBUILD_RECIPE_PATH (colon-separated, as a maintainer sets it), then the shipped recipes."""
    dirs = [own] + [Path(d) for d in os.environ.get(SEARCH_PATH_ENV, "").split(":") if d] + [SHIPPED]
    seen: list[Path] = []
    for d in dirs:
        if d.resolve() not in [s.resolve() for s in seen]:
            seen.append(d)
    return seen


def _parent(via: Val) -> Path:
    """The recipe file `via` (an `extends` value) names: the first NAME.toml on the search path. Its own inputs
    (keyring, scripts, files) stay confined to the directory it is found in, as any recipe's."""
    dirs = search_path(via.src.dir)
    for d in dirs:
        candidate = d / f"{via.value}.toml"
        if os.path.lexists(candidate):  # a dangling or looping link is named by the resolve error
            return candidate
    raise via.error(f"found {v.quote(via.value)}, but no {via.value}.toml in {', '.join(str(d) for d in dirs)}; "
                    f"expected the name of a recipe in the recipe's directory, in ${SEARCH_PATH_ENV} or shipped")


def _read(path: Path) -> tuple[dict[str, Any], Source]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RecipeError(str(path), None, "", f"cannot read: {e.strerror or e}") from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(str(path), data[: e.start].count(b"\n") + 1, "", "invalid TOML: not UTF-8 text") from e
    too_deep = _nesting_problem(text)
    if too_deep:
        raise RecipeError(str(path), *too_deep)
    try:
        doc = tomllib.loads(text)
    except RecursionError as e:  # not reached after the nesting check; kept so a gap there is exit 2, not 1
        raise RecipeError(str(path), None, "", f"invalid TOML: {NESTING_EXPECTED}") from e
    except tomllib.TOMLDecodeError as e:
        message = str(e)
        match = _TOML_POSITION.search(message)
        line = None
        if match:
            message = message[: match.start()]
            line = int(match.group(1)) if match.group(1) else text.rstrip().count("\n") + 1
        message = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)  # keep it one line
        raise RecipeError(str(path), line, "", f"invalid TOML: {message}") from e
    return doc, Source(path, Locator(text))


MAX_NESTING = 32
NESTING_EXPECTED = (f"nested too deeply, expected at most {MAX_NESTING} levels of arrays and inline tables and at"
                    f" most {MAX_NESTING} parts in a dotted key")
# The tokens that matter for nesting. Strings and comments are skipped whole: brackets in them do not count.
_NESTING_TOKEN = re.compile(r'"""|' r"'''|" r"""["'#\[\]{}=.,\n]""")
_STRING_REST = {
    '"': re.compile(r'(?:[^"\\\n]|\\.)*"'),
    "'": re.compile(r"[^'\n]*'"),
    '"""': re.compile(r'(?:[^\\]|\\.)*?"""(?:""?(?!"))?', re.DOTALL),
    "'''": re.compile(r"[\s\S]*?'''(?:''?(?!'))?"),
}
_SIMPLE_KEY_RE = re.compile(r"[A-Za-z0-9_-]{1,60}")


def _nesting_problem(text: str) -> tuple[int, str, str] | None:
    """(line, field, message) if arrays, inline tables or dotted keys nest deeper than MAX_NESTING, else None.

    tomllib recurses once per level (deep enough, it ends in RecursionError) and its time and memory grow with the
    square of a dotted key's length, so this linear scan runs first. `field` is the key on the line, if plain."""
    stack: list[str] = []  # the open [ and { of values
    in_key = True  # reading a key: at a line start outside arrays, after `{` or `,` in an inline table, in a [header]
    header = False
    key_parts = 1
    i = 0
    while match := _NESTING_TOKEN.search(text, i):
        token, i = match.group(), match.end()
        if token in _STRING_REST:
            rest = _STRING_REST[token].match(text, i)
            i = rest.end() if rest else len(text)
        elif token == "#":
            newline = text.find("\n", i)
            i = len(text) if newline < 0 else newline
        elif token == "\n":
            if not stack:
                in_key, header, key_parts = True, False, 1
        elif token == "=":
            in_key = False
        elif token == ".":
            key_parts += in_key
        elif token == "[" and in_key and not stack:
            header = True
        elif token in "[{":
            stack.append(token)
            in_key, key_parts = token == "{", 1
        elif token in "]}":
            if stack and not header:
                stack.pop()
        elif token == "," and stack and stack[-1] == "{":
            in_key, key_parts = True, 1
        if len(stack) > MAX_NESTING or key_parts > MAX_NESTING:
            line_start = text.rfind("\n", 0, match.start()) + 1
            key = text[line_start : match.start()].partition("=")[0].strip()
            return (text.count("\n", 0, match.start()) + 1, key if _SIMPLE_KEY_RE.fullmatch(key) else "",
                    f"invalid TOML: {NESTING_EXPECTED}")
    return None


def _parse_layer(doc: dict[str, Any], src: Source) -> _Layer:
    top = v.table(Val(doc, src, ""), ("extends", "template", "bootstrap", "sources", "packages", "repositories",
                                      "scripts", "files"))
    layer = _Layer(src)
    if "extends" in top:
        layer.extends = top["extends"]
        v.grammar(v.NAME_RE, f"the name of a recipe on the search path ({v.NAME_EXPECTED})")(layer.extends)
    if "template" in top:
        layer.template = {k: _TEMPLATE[k](val) for k, val in v.table(top["template"], tuple(_TEMPLATE)).items()}
    if "bootstrap" in top:
        layer.bootstrap = {k: _BOOTSTRAP[k](val) for k, val in v.table(top["bootstrap"], tuple(_BOOTSTRAP)).items()}
    if "sources" in top:
        layer.sources = {k: _SOURCES[k](val) for k, val in v.table(top["sources"], tuple(_SOURCES)).items()}
    if "packages" in top:
        layer.include, layer.exclude = _package_lists(v.table(top["packages"], ("include", "exclude")))
    repositories = _entries(top.get("repositories"))
    layer.repositories = [_repository(entry) for entry in repositories]
    v.refuse_repeats([r.name for r in layer.repositories], repositories, "name", "repository name")
    owner = layer.template.get("name", src.path.stem)
    layer.scripts = [_script(entry, f"{owner}:inline-{i + 1}") for i, entry in enumerate(_entries(top.get("scripts")))]
    files = _entries(top.get("files"))
    layer.files = [_file(entry) for entry in files]
    v.refuse_repeats([f.dest for f in layer.files], files, "dest", "destination")
    return layer


def _entries(val: Val | None) -> list[Val]:
    if val is None:
        return []
    if not isinstance(val.value, list):
        raise val.wrong_type(f"an array of tables ([[{val.field}]])")
    return list(val.items())


def _package_lists(fields: dict[str, Val]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    lists = {k: v.unique_list(val, _packages, "package", non_empty=False) for k, val in fields.items()}
    include, exclude = lists.get("include", ()), lists.get("exclude", ())
    for j, name in enumerate(exclude):
        if name in include:
            raise Val(name, fields["exclude"].src, f"packages.exclude[{j}]").error(
                f"found {v.quote(name)}, also in packages.include[{include.index(name)}]; expected a package in"
                " only one of include and exclude")
    return include, exclude


def _repository(entry: Val) -> AptRepository:
    fields = v.table(entry, ("name", "uris", "suites", "components", "key", "packages"))
    name = v.grammar(v.REPOSITORY_NAME_RE, v.REPOSITORY_NAME_EXPECTED)(
        v.required(fields, "name", entry, v.REPOSITORY_NAME_EXPECTED))
    uris = v.unique_list(v.required(fields, "uris", entry, "an array of http:// or https:// URLs"),
                         v.url(("http", "https")), "URI")
    suites = v.unique_list(v.required(fields, "suites", entry, "an array of suite names"),
                           v.grammar(v.SUITE_RE, v.SUITE_EXPECTED, v.SUITE_MAX_LENGTH), "suite")
    components: tuple[str, ...] = ("main",)
    if "components" in fields:
        components = _BOOTSTRAP["components"](fields["components"])
    key_val = v.required(fields, "key", entry, "the path of the repository's public key file")
    key_path, key = v.read_input(key_val, "key")
    problem = v.key_problem(key)
    if problem:
        raise key_val.error(f"in {key_path}: {problem}")
    packages: tuple[str, ...] = ()
    if "packages" in fields:
        packages = v.unique_list(fields["packages"], _packages, "package", non_empty=False)
    return AptRepository(name=name, uris=uris, suites=suites, components=components, key=key,
                         key_armored=v.key_armored(key), packages=packages)


def _script(entry: Val, inline_name: str) -> Script:
    fields = v.table(entry, ("stage", "run", "file"))
    stage = Stage(v.one_of([s.value for s in Stage])(v.required(fields, "stage", entry, "a stage")))
    if ("run" in fields) == ("file" in fields):
        found = "both run and file" if "run" in fields else "neither run nor file"
        raise entry.error(f"found {found}, expected exactly one of them")
    if "run" in fields:
        return Script(stage=stage, name=inline_name, content=v.text(fields["run"]).encode())
    path, content = v.read_input(fields["file"], "script")
    return Script(stage=stage, name=path.name, content=content)


def _file(entry: Val) -> FileEntry:
    fields = v.table(entry, ("dest", "content", "source", "mode"))
    dest = v.dest_path(v.required(fields, "dest", entry, "an absolute path inside the template"))
    if ("content" in fields) == ("source" in fields):
        found = "both content and source" if "content" in fields else "neither content nor source"
        raise entry.error(f"found {found}, expected exactly one of them")
    if "content" in fields:
        content = v.text(fields["content"], non_empty=False).encode()
    else:
        content = v.read_input(fields["source"], "source")[1]
    mode = v.file_mode(fields["mode"]) if "mode" in fields else 0o644
    return FileEntry(dest=dest, content=content, mode=mode)


def _merge(layers: list[_Layer]) -> dict[str, Any]:
    """Child over parent. Lists of packages accumulate; repositories and files are keyed (name, dest) and a
    child's entry replaces the parent's in place; scripts accumulate, then run in stage order."""
    template: dict[str, Any] = {}
    bootstrap: dict[str, Any] = {}
    sources: dict[str, Any] = {}
    include: list[str] = []
    exclude: list[str] = []
    repositories: dict[str, AptRepository] = {}
    scripts: list[Script] = []
    files: dict[str, FileEntry] = {}
    for layer in layers:
        template.update(layer.template)
        bootstrap.update(layer.bootstrap)
        sources.update(layer.sources)
        include = [p for p in dict.fromkeys(include + list(layer.include)) if p not in layer.exclude]
        exclude = [p for p in dict.fromkeys(exclude + list(layer.exclude)) if p not in layer.include]
        repositories.update((r.name, r) for r in layer.repositories)
        scripts += layer.scripts
        files.update((f.dest, f) for f in layer.files)
    scripts.sort(key=lambda s: _STAGE_ORDER[s.stage])  # stable: within a stage, parent's scripts first
    return {"template": template, "bootstrap": bootstrap, "sources": sources, "include": tuple(include), "exclude": tuple(exclude),
            "repositories": tuple(repositories.values()), "scripts": tuple(scripts), "files": tuple(files.values())}


def _canonical(recipe: Recipe, path_digests: dict[Path, str]) -> bytes:
    """Everything the recipe contributes to a build, as stable bytes: file contents by sha256, the keyring by
    the sha256 of its content (never a path), so moving the recipes or editing comments keeps the hash."""

    def plain(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj):
            return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                    if f.name not in ("path", "canonical")}
        if isinstance(obj, enum.Enum):
            return obj.value
        if isinstance(obj, bytes):
            return hashlib.sha256(obj).hexdigest()
        if isinstance(obj, Path):  # the keyring is the only Path inside a Recipe
            return path_digests[obj]
        if isinstance(obj, (tuple, list)):
            return [plain(x) for x in obj]
        return obj

    document = {"canonical_format": 1, "recipe": plain(recipe)}
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
