"""Recipe loading: strict TOML parse of each file in the `extends` chain, merge, defaults, typed `Recipe`.

Every value is checked in the file that sets it, before merging, so an error names the file and line the user
must edit, even when the value is inherited. Only "required field missing" is decided after the merge (a child
may inherit it) and is reported against the recipe being loaded.

Script names: a file-backed script is named after its file (`ssh-regenerate-host-keys.sh`); an inline one is
`<template name of the recipe file that defines it>:inline-<N>`, N being the 1-based position of the script
among that file's `[[scripts]]` entries. The name is the same whichever recipe of the chain is loaded.

`load_recipe(path)` raises the first error it meets. `load_recipe(path, all_errors=True)` (what `tmplbuild check`
runs) goes on after each refused value, without it, and raises RecipeErrors with every error of every file of the
chain. Only what leaves nothing to check stops a file: unreadable or invalid TOML, and an `extends` that cannot be
followed (malformed, missing parent, cycle), which also stops the chain, so the merged recipe is not checked.
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
from typing import Any, TypeVar

from tmplbuild.errors import RecipeError, UsageError
from tmplbuild.recipe import validate as v
from tmplbuild.recipe.locate import Locator, Source, Val
from tmplbuild.recipe.validate import Errors
from tmplbuild.recipe.model import (
    ARCHITECTURES, VARIANTS, AptRepository, Bootstrap, Compression, FileEntry, Recipe, Script, Sources, Stage,
)

_TOML_POSITION = re.compile(r"\s*\(at (?:line (\d+), column \d+|end of document)\)\Z")
_STAGE_ORDER = {stage: i for i, stage in enumerate(Stage)}
_T = TypeVar("_T")


class RecipeErrors(RecipeError):
    """Every error of a recipe (load_recipe(path, all_errors=True)), in `errors`: ordered by file and line, each
    once. Its own message is the first one's, so a handler of RecipeError still reports something true."""

    def __init__(self, errors: list[RecipeError]) -> None:
        unique = {(e.path, e.line, e.field, e.message): e for e in reversed(errors)}  # the first of equal ones
        self.errors = sorted(reversed(unique.values()), key=lambda e: (e.path, e.line or 0))
        first = self.errors[0]
        UsageError.__init__(self, first.check, first.message)
        self.path, self.line, self.field = first.path, first.line, first.field


def _attempt(errors: Errors, check: Callable[[], _T]) -> _T | None:
    """check()'s value. Collecting (`errors` is a list), a RecipeError is recorded instead and the value is None:
    the caller goes on without it. No check returns None itself."""
    if errors is None:
        return check()
    try:
        return check()
    except RecipeError as error:
        errors.append(error)
        return None


def _count(errors: Errors) -> int:
    return 0 if errors is None else len(errors)


def _plain(check: Callable[[Val], Any]) -> Callable[[Val, Errors], Any]:
    """A check of one value, which has no parts to collect errors from."""
    return lambda val, errors: check(val)


def _keyring(val: Val) -> tuple[Path, str]:
    path, data = v.read_input(val, "keyring", system_dir=v.SYSTEM_KEYRINGS)
    problem = v.key_problem(data, armor_ok=False)  # gpgv --keyring reads binary keyrings only
    if problem:
        raise val.error(f"in {path}: {problem}")
    return path.resolve(), hashlib.sha256(data).hexdigest()


def _formats(val: Val, errors: Errors) -> tuple[Compression, ...]:
    before = _count(errors)
    formats = tuple(map(Compression, v.unique_list(val, v.one_of([c.value for c in Compression]), "format",
                                                   errors=errors)))
    if _count(errors) > before:
        return formats  # a refused format may have been the tar
    if not any(f.is_rootfs_tar for f in formats):
        # The OCI image is made from the same tar; a template's boot test and its plain-tar users need one.
        raise val.error(f"found only {', '.join(f.value for f in formats)}, expected tar.zst or tar.xz too")
    return formats


# Each field's check: (value, errors) -> the checked value (see _attempt for `errors`).
_TEMPLATE: dict[str, Callable[[Val, Errors], Any]] = {
    "name": _plain(v.grammar(v.NAME_RE, v.NAME_EXPECTED)),
    "distribution": _plain(v.grammar(v.DISTRIBUTION_RE, v.NAME_EXPECTED)),
    "release": _plain(v.grammar(v.RELEASE_RE, v.RELEASE_EXPECTED)),
    "suite": _plain(v.grammar(v.SUITE_RE, v.SUITE_EXPECTED, v.SUITE_MAX_LENGTH)),
    "variant": _plain(v.grammar(v.NAME_RE, v.NAME_EXPECTED)),
    "architectures": lambda val, errors: v.unique_list(val, v.one_of(ARCHITECTURES), "architecture", errors=errors),
    "description": _plain(v.description),
    "formats": _formats,
    "version": _plain(v.grammar(v.VERSION_RE, v.VERSION_EXPECTED)),
}
_BOOTSTRAP: dict[str, Callable[[Val, Errors], Any]] = {
    "variant": _plain(v.one_of(VARIANTS)),
    "components": lambda val, errors: v.unique_list(val, v.grammar(v.COMPONENT_RE, v.COMPONENT_EXPECTED),
                                                    "component", errors=errors),
    "keyring": _plain(_keyring),
    "mirror": _plain(v.url(("http", "https", "file"))),
    "extra_suites": lambda val, errors: v.unique_list(
        val, v.grammar(v.SUITE_RE, v.SUITE_EXPECTED, v.SUITE_MAX_LENGTH), "suite", non_empty=False, errors=errors),
    "security_mirror": _plain(v.url(("http", "https", "file"))),
}
_SOURCES: dict[str, Callable[[Val, Errors], Any]] = {
    "mirror": _plain(v.template_source_url),
    "security_mirror": _plain(v.template_source_url),
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
    refused: set[str] = field(default_factory=set)  # collecting: tables and fields set, but refused ("template.name")


def load_recipe(path: Path | str, *, all_errors: bool = False) -> Recipe:
    """Load, merge (`extends`) and validate a recipe, reading every file it names.

    Raises RecipeError (naming file, line and field) for unreadable or invalid TOML, unknown fields, wrong
    types, values outside their grammar, missing or unreadable files, and `extends` cycles: the first one met,
    or, with `all_errors`, RecipeErrors holding every one of them.
    """
    errors: Errors = [] if all_errors else None
    layers, complete = _load_chain(Path(path), errors)  # root first
    if complete:  # else a parent is missing: no "missing required field" the parent may have set
        merged = _merge(layers)
        leaf = layers[-1]
        refused = set().union(*(layer.refused for layer in layers))
        for name, expected in _REQUIRED.items():
            table, key = name.split(".")
            if key not in merged[table] and not {table, name} & refused:
                v.report(leaf.src.error(name, f"missing required field, expected {expected}"), errors)
    if errors:
        raise RecipeErrors(errors)
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


def _load_chain(path: Path, errors: Errors = None) -> tuple[list[_Layer], bool]:
    """The layers of the chain, root first, and whether the chain is whole: collecting (`errors`), a file that
    cannot be read or parsed, or an `extends` that cannot be followed, ends it early."""
    chain: list[_Layer] = []  # leaf first while loading
    seen: list[Path] = []
    via: Val | None = None  # the `extends` that led to `path`

    def broken(error: RecipeError) -> tuple[list[_Layer], bool]:
        v.report(error, errors)
        return chain[::-1], False

    while True:
        try:
            resolved = path.resolve()
        except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop
            if via is None:
                error = RecipeError(str(path), None, "", f"cannot read: {e}")
            else:
                error = via.error(f"found {v.quote(via.value)}, but {path} cannot be resolved ({e})")
            error.__cause__ = e
            return broken(error)
        if via is not None:
            if resolved in seen:
                names = " -> ".join([p.stem for p in seen] + [resolved.stem])
                return broken(via.error(f"found an extends cycle: {names}"))
            if not resolved.is_relative_to(path.parent.resolve()):  # its text and inputs go into the template too
                return broken(via.error(f"found {v.quote(via.value)}, but {path} resolves to {resolved}, outside"
                                        f" the directory {path.parent.resolve()} it was found in; expected a recipe"
                                        " there"))
        read = _attempt(errors, lambda: _read(path))
        if read is None:
            return chain[::-1], False
        layer = _parse_layer(*read, errors)
        name = layer.template.get("name")
        if name is None and not {"template", "template.name"} & layer.refused:
            if layer.extends is None and "extends" not in layer.refused:
                v.report(layer.src.error("template.name", f"missing required field, expected {v.NAME_EXPECTED}"),
                         errors)
            else:
                line = layer.src.locator.line("template") or layer.src.locator.line("extends")
                v.report(layer.src.error("template.name", "missing; a recipe that extends another must set its own"
                                         " name, else its template would overwrite the parent's", line), errors)
        for child in chain:
            if name is not None and child.template.get("name") == name:
                v.report(child.src.error("template.name", f"found {v.quote(name)}, the name of the recipe it"
                                         f" extends ({path}), expected a name of its own"), errors)
        chain.append(layer)
        seen.append(resolved)
        if layer.extends is None:
            return chain[::-1], "extends" not in layer.refused
        via = layer.extends
        parent = _attempt(errors, lambda: _parent(via))
        if parent is None:
            return chain[::-1], False
        path = parent


def include_origins(path: Path | str) -> dict[str, Val]:
    """Where each package of a valid recipe's `packages.include` is set: its entry (`packages.include[N]`) in the
    file nearest the leaf that lists it, for messages about the package as a whole (`tmplbuild check --resolve`).
    Raises RecipeError as load_recipe does."""
    origins: dict[str, Val] = {}
    for layer in _load_chain(Path(path))[0]:  # root first: a child's entry is the one in effect
        for index, name in enumerate(layer.include):
            origins[name] = Val(name, layer.src, f"packages.include[{index}]")
    return origins


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


def _parse_layer(doc: dict[str, Any], src: Source, errors: Errors = None) -> _Layer:
    top = v.table(Val(doc, src, ""), ("extends", "template", "bootstrap", "sources", "packages", "repositories",
                                      "scripts", "files"), errors=errors)
    layer = _Layer(src)
    if "extends" in top:
        extends = top["extends"]
        if _attempt(errors, lambda: v.grammar(v.NAME_RE, f"the name of a recipe on the search path"
                                                         f" ({v.NAME_EXPECTED})")(extends)) is None:
            layer.refused.add("extends")
        else:
            layer.extends = extends
    if "template" in top:
        layer.template = _fields(layer, "template", _TEMPLATE, errors,
                                 lambda: v.table(top["template"], tuple(_TEMPLATE), errors=errors))
    if "bootstrap" in top:
        layer.bootstrap = _fields(layer, "bootstrap", _BOOTSTRAP, errors,
                                  lambda: v.table(top["bootstrap"], tuple(_BOOTSTRAP), errors=errors))
    if "sources" in top:
        layer.sources = _fields(layer, "sources", _SOURCES, errors,
                                lambda: v.table(top["sources"], tuple(_SOURCES), errors=errors))
    if "packages" in top:
        lists = _attempt(errors, lambda: v.table(top["packages"], ("include", "exclude"), errors=errors))
        if lists is not None:
            layer.include, layer.exclude = _package_lists(lists, errors)
    repositories = _entries(top.get("repositories"), lambda entry, _: _repository(entry, errors), errors)
    layer.repositories = [r for _, r in repositories]
    v.refuse_repeats([r.name for _, r in repositories], [e for e, _ in repositories], "name", "repository name",
                     errors=errors)
    owner = layer.template.get("name", src.path.stem)
    layer.scripts = [script for _, script in _entries(
        top.get("scripts"), lambda entry, i: _script(entry, f"{owner}:inline-{i + 1}", errors), errors)]
    files = _entries(top.get("files"), lambda entry, _: _file(entry, errors), errors)
    layer.files = [f for _, f in files]
    v.refuse_repeats([f.dest for _, f in files], [e for e, _ in files], "dest", "destination", errors=errors)
    return layer


def _fields(layer: _Layer, name: str, checks: dict[str, Callable[[Val, Errors], Any]], errors: Errors,
            read: Callable[[], dict[str, Val]]) -> dict[str, Any]:
    """The checked fields of one table of a layer: `read` gives them (refusing unknown ones), `checks` checks each.
    Collecting, what is refused is left out and named in layer.refused."""
    fields = _attempt(errors, read)
    if fields is None:
        layer.refused.add(name)
        return {}
    out: dict[str, Any] = {}
    for key, val in fields.items():
        value = _attempt(errors, lambda: checks[key](val, errors))
        if value is None:
            layer.refused.add(f"{name}.{key}")
        else:
            out[key] = value
    return out


def _entries(val: Val | None, check: Callable[[Val, int], _T | None], errors: Errors) -> list[tuple[Val, _T]]:
    """Each entry of an array of tables with what `check(entry, index)` made of it; collecting (`errors`), an entry
    with an error is left out."""
    if val is None:
        return []
    if not isinstance(val.value, list):
        v.report(val.wrong_type(f"an array of tables ([[{val.field}]])"), errors)
        return []
    out = []
    for index, entry in enumerate(val.items()):
        before = _count(errors)
        made = _attempt(errors, lambda: check(entry, index))
        if made is not None and _count(errors) == before:
            out.append((entry, made))
    return out


def _package_lists(fields: dict[str, Val], errors: Errors = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    lists = {}
    for k, val in fields.items():
        checked = _attempt(errors, lambda: v.unique_list(val, _packages, "package", non_empty=False, errors=errors))
        lists[k] = () if checked is None else checked
    include, exclude = lists.get("include", ()), lists.get("exclude", ())
    for j, name in enumerate(exclude):
        if name in include:
            v.report(Val(name, fields["exclude"].src, f"packages.exclude[{j}]").error(
                f"found {v.quote(name)}, also in packages.include[{include.index(name)}]; expected a package in"
                " only one of include and exclude"), errors)
    return include, exclude


def _repository(entry: Val, errors: Errors = None) -> AptRepository | None:
    """The repository of one [[repositories]] entry; collecting (`errors`), None when a field of it was refused."""
    fields = v.table(entry, ("name", "uris", "suites", "components", "key", "packages"), errors=errors)
    before = _count(errors)
    name = _attempt(errors, lambda: v.grammar(v.REPOSITORY_NAME_RE, v.REPOSITORY_NAME_EXPECTED)(
        v.required(fields, "name", entry, v.REPOSITORY_NAME_EXPECTED)))
    uris = _attempt(errors, lambda: v.unique_list(
        v.required(fields, "uris", entry, "an array of http:// or https:// URLs"), v.url(("http", "https")), "URI",
        errors=errors))
    suites = _attempt(errors, lambda: v.unique_list(
        v.required(fields, "suites", entry, "an array of suite names"),
        v.grammar(v.SUITE_RE, v.SUITE_EXPECTED, v.SUITE_MAX_LENGTH), "suite", errors=errors))
    components: tuple[str, ...] | None = ("main",)
    if "components" in fields:
        components = _attempt(errors, lambda: _BOOTSTRAP["components"](fields["components"], errors))

    def read_key() -> bytes:
        key_val = v.required(fields, "key", entry, "the path of the repository's public key file")
        key_path, key = v.read_input(key_val, "key")
        problem = v.key_problem(key)
        if problem:
            raise key_val.error(f"in {key_path}: {problem}")
        return key

    key = _attempt(errors, read_key)
    packages: tuple[str, ...] | None = ()
    if "packages" in fields:
        packages = _attempt(errors, lambda: v.unique_list(fields["packages"], _packages, "package", non_empty=False,
                                                          errors=errors))
    if _count(errors) > before:
        return None
    return AptRepository(name=name, uris=uris, suites=suites, components=components, key=key,
                         key_armored=v.key_armored(key), packages=packages)


def _script(entry: Val, inline_name: str, errors: Errors = None) -> Script | None:
    """The script of one [[scripts]] entry; collecting (`errors`), None when a field of it was refused."""
    fields = v.table(entry, ("stage", "run", "file"), errors=errors)
    before = _count(errors)
    stage = _attempt(errors, lambda: Stage(v.one_of([s.value for s in Stage])(
        v.required(fields, "stage", entry, "a stage"))))
    name, content = inline_name, None
    if ("run" in fields) == ("file" in fields):
        found = "both run and file" if "run" in fields else "neither run nor file"
        v.report(entry.error(f"found {found}, expected exactly one of them"), errors)
    elif "run" in fields:
        content = _attempt(errors, lambda: v.text(fields["run"]).encode())
    else:
        read = _attempt(errors, lambda: v.read_input(fields["file"], "script"))
        if read is not None:
            name, content = read[0].name, read[1]
    if _count(errors) > before:
        return None
    return Script(stage=stage, name=name, content=content)


def _file(entry: Val, errors: Errors = None) -> FileEntry | None:
    """The file of one [[files]] entry; collecting (`errors`), None when a field of it was refused."""
    fields = v.table(entry, ("dest", "content", "source", "mode"), errors=errors)
    before = _count(errors)
    dest = _attempt(errors, lambda: v.dest_path(v.required(fields, "dest", entry,
                                                           "an absolute path inside the template")))
    content = None
    if ("content" in fields) == ("source" in fields):
        found = "both content and source" if "content" in fields else "neither content nor source"
        v.report(entry.error(f"found {found}, expected exactly one of them"), errors)
    elif "content" in fields:
        content = _attempt(errors, lambda: v.text(fields["content"], non_empty=False).encode())
    else:
        content = _attempt(errors, lambda: v.read_input(fields["source"], "source")[1])
    mode = _attempt(errors, lambda: v.file_mode(fields["mode"])) if "mode" in fields else 0o644
    if _count(errors) > before:
        return None
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
