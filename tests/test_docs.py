"""The contracts in docs/ stay true to the code.

- docs/exit-codes.md lists exactly the members and values of tmplbuild.errors.ExitCode;
- docs/recipes.md documents every field the recipe loader accepts, at the top level and in every table, with the
  required ones marked, and every stage, format, architecture and bootstrap variant the model knows. The accepted
  fields are read from the loader's own code (every `v.table(...)` call in tmplbuild/recipe/load.py) and
  cross-checked against what the loader answers for an unknown field;
- every relative Markdown link in README.md and docs/*.md points at a file of the repository (and, for a link
  into a Markdown file with a #fragment, at one of its headings);
- nothing points at ../shared (the design notes that used to live outside the repository).
"""
from __future__ import annotations

import ast
import re
import tomllib
import urllib.parse
from pathlib import Path

import pytest

from tmplbuild.errors import ExitCode, RecipeError
from tmplbuild.recipe import load, model

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = ("README.md", "repository.md", "trust.md", "exit-codes.md", "recipes.md")


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def test_the_contract_pages_exist():
    missing = [name for name in PAGES if not (DOCS / name).is_file()]
    assert not missing, f"docs/ lacks {missing}"


# -- exit codes ---------------------------------------------------------------------------------------------------

_EXIT_ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*`([A-Za-z_][A-Za-z0-9_]*)`\s*\|", re.M)


def test_exit_code_table_is_exactly_exitcode():
    rows = _EXIT_ROW.findall((DOCS / "exit-codes.md").read_text())
    assert rows, "docs/exit-codes.md has no `| code | `NAME` | meaning |` table"
    names = [name for _, name in rows]
    assert len(names) == len(set(names)), f"a member is listed twice: {names}"
    codes = [int(code) for code, _ in rows]
    assert len(codes) == len(set(codes)), f"a code is listed twice: {codes}"
    documented = {name: int(code) for code, name in rows}
    assert documented == {member.name: member.value for member in ExitCode}


# -- recipe fields ------------------------------------------------------------------------------------------------

# Functions of the loader that check one entry of an array of tables; their `v.table(entry, ...)` is that table's.
_ENTRY_FUNCTIONS = {"_repository": "repositories", "_script": "scripts", "_file": "files"}
_TOP = ""  # the top level of a recipe file


def _is_v_call(node: ast.AST, name: str) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "v")


def _table_of(node: ast.expr, function: str) -> str:
    """Which recipe table the first argument of a `v.table(...)` call is."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Val":
        field = node.args[2] if len(node.args) > 2 else None
        if isinstance(field, ast.Constant) and field.value == "":
            return _TOP
    if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "top"
            and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str)):
        return node.slice.value
    if isinstance(node, ast.Name) and function in _ENTRY_FUNCTIONS:
        return _ENTRY_FUNCTIONS[function]
    raise AssertionError(f"tests/test_docs.py does not know which table v.table({ast.unparse(node)}, ...) in "
                         f"{function}() checks: teach _table_of, and document its fields in docs/recipes.md")


def _keys_of(node: ast.expr) -> set[str]:
    """The accepted keys, the second argument of a `v.table(...)` call: a literal tuple, or tuple(<module dict>)."""
    if isinstance(node, (ast.Tuple, ast.List)) and all(isinstance(e, ast.Constant) for e in node.elts):
        return {e.value for e in node.elts}
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "tuple"
            and len(node.args) == 1 and isinstance(node.args[0], ast.Name)):
        return set(getattr(load, node.args[0].id))
    raise AssertionError(f"tests/test_docs.py cannot read the keys {ast.unparse(node)} of a v.table call")


def loader_fields() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(table -> accepted keys, table -> required keys), from tmplbuild/recipe/load.py's code."""
    tree = ast.parse(Path(load.__file__).read_text())
    accepted: dict[str, set[str]] = {}
    required: dict[str, set[str]] = {}
    seen = 0
    for function in (n for n in tree.body if isinstance(n, ast.FunctionDef)):
        for node in ast.walk(function):
            if _is_v_call(node, "table"):
                seen += 1
                accepted.setdefault(_table_of(node.args[0], function.name), set()).update(_keys_of(node.args[1]))
            elif _is_v_call(node, "required") and function.name in _ENTRY_FUNCTIONS:
                key = node.args[1]
                assert isinstance(key, ast.Constant), ast.unparse(node)
                required.setdefault(_ENTRY_FUNCTIONS[function.name], set()).add(key.value)
    total = sum(1 for n in ast.walk(tree) if _is_v_call(n, "table"))
    assert seen == total, "a v.table call outside a module-level function: teach loader_fields()"
    for name in load._REQUIRED:  # "template.name", ...: required after merging
        table, key = name.split(".")
        required.setdefault(table, set()).add(key)
    return accepted, required


ACCEPTED, REQUIRED = loader_fields()


def test_loader_fields_were_found():
    """The code reading above found the recipe's shape (a refactor of the loader must keep this test honest)."""
    assert _TOP in ACCEPTED and "extends" in ACCEPTED[_TOP]
    tables = set(ACCEPTED) - {_TOP}
    assert tables <= ACCEPTED[_TOP], f"tables the top level does not accept: {tables - ACCEPTED[_TOP]}"
    assert {"template", "bootstrap", "repositories", "scripts", "files"} <= tables
    assert all(ACCEPTED[t] for t in ACCEPTED)
    for table, keys in REQUIRED.items():
        assert keys <= ACCEPTED[table], f"required but not accepted in {table}: {keys - ACCEPTED[table]}"


@pytest.mark.parametrize("table", sorted(ACCEPTED))
def test_loader_fields_match_what_the_loader_answers(table: str, tmp_path: Path):
    """An unknown field makes the loader list what it accepts there: the same set the code reading found."""
    forms = ["zz_unknown = 1\n"] if table == _TOP else [f"[{table}]\nzz_unknown = 1\n", f"[[{table}]]\nzz_unknown = 1\n"]
    answers = []
    for text in forms:
        path = tmp_path / "probe.toml"
        path.write_text(text)
        with pytest.raises(RecipeError) as caught:
            load.load_recipe(path)
        answers.append(str(caught.value))
        match = re.search(r"unknown field; expected one of: (.*)\Z", str(caught.value))
        if match:
            assert set(match.group(1).split(", ")) == ACCEPTED[table]
            return
    pytest.fail(f"no form of an unknown field in {table or 'the top level'} gave the accepted fields: {answers}")


def _sections(text: str) -> dict[str, str]:
    """Level-2 heading -> its text, up to the next level-2 heading."""
    parts = re.split(r"^## (.*)$", text, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def _section_for(sections: dict[str, str], table: str) -> str:
    if table == _TOP:
        wanted = [h for h in sections if h.lower() == "top level"]
    else:
        wanted = [h for h in sections if f"`[{table}]`" in h or f"`[[{table}]]`" in h]
    assert len(wanted) == 1, f"docs/recipes.md: expected one section for {table or 'the top level'}, found {wanted}"
    return sections[wanted[0]]


def _field_rows(section: str) -> dict[str, str]:
    """`field` -> the table row that documents it (a row may name several fields: | `a`, `b` | ...)."""
    rows = {}
    for line in section.splitlines():
        if line.startswith("|"):
            first = line.split("|")[1]
            for name in re.findall(r"`([A-Za-z0-9_]+)`", first):
                rows[name] = line
    return rows


@pytest.mark.parametrize("table", sorted(ACCEPTED))
def test_recipes_md_documents_every_field(table: str):
    section = _section_for(_sections((DOCS / "recipes.md").read_text()), table)
    rows = _field_rows(section)
    missing = sorted(ACCEPTED[table] - set(rows))
    assert not missing, f"docs/recipes.md does not document {table or 'top-level'} field(s) {missing}"
    for key in REQUIRED.get(table, ()):
        assert "required" in rows[key], f"docs/recipes.md: {table}.{key} is required, and its row does not say so"
    unknown = sorted(set(rows) - ACCEPTED[table])
    assert not unknown, f"docs/recipes.md documents {table or 'top-level'} field(s) the loader refuses: {unknown}"


def test_recipes_md_names_every_value_the_model_accepts():
    text = (DOCS / "recipes.md").read_text()
    values = {*(s.value for s in model.Stage), *(c.value for c in model.Compression), *model.ARCHITECTURES,
              *model.VARIANTS}
    missing = sorted(v for v in values if f"`{v}`" not in text)
    assert not missing, f"docs/recipes.md does not name {missing}"


def test_recipes_md_examples_are_toml():
    blocks = re.findall(r"^```toml\n(.*?)^```", (DOCS / "recipes.md").read_text(), flags=re.M | re.S)
    assert blocks
    for block in blocks:
        tomllib.loads(block)


# -- links --------------------------------------------------------------------------------------------------------

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
_INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
_SCHEME = re.compile(r"\A[A-Za-z][A-Za-z0-9+.-]*:")


def links(text: str) -> list[str]:
    """The link targets of Markdown text, outside fenced code blocks and code spans."""
    prose = _CODE_SPAN.sub("", _FENCE.sub("", text))
    return _INLINE_LINK.findall(prose) + _REFERENCE_LINK.findall(prose)


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file."""
    text = _FENCE.sub("", path.read_text())
    found = set()
    for heading in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        found.add(slug)
    return found


def test_links_helper_sees_what_it_should():
    text = "a [x](docs/a.md) `[y](no.md)` [z](http://h/) [w](#top)\n```\n[v](no2.md)\n```\n[r]: ref.md\n"
    assert links(text) == ["docs/a.md", "http://h/", "#top", "ref.md"]


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files_of_the_repository(page: Path):
    broken = []
    for target in links(page.read_text()):
        if _SCHEME.match(target):
            continue
        raw_path, _, fragment = target.partition("#")
        raw_path = raw_path.partition("?")[0]
        resolved = (page.parent / urllib.parse.unquote(raw_path)).resolve() if raw_path else page
        if not resolved.is_relative_to(ROOT) or not resolved.exists():
            broken.append(f"{target} (no such file in the repository)")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            broken.append(f"{target} (no heading #{fragment} in {resolved.relative_to(ROOT)})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def test_nothing_points_at_shared():
    files = [ROOT / "README.md", *sorted(p for p in DOCS.rglob("*") if p.is_file())]
    offending = [str(p.relative_to(ROOT)) for p in files if "../shared" in p.read_text(errors="replace")]
    assert not offending, f"still pointing at ../shared: {offending}"
