"""Signed documents and the client's state are read strictly (tmplbuild.strictjson), and every integer of the
index has a documented range: duplicate keys, NaN, deep nesting, non-UTF-8, out-of-range or boolean integers
are refused (exit 3, "index schema") and never reach the client's state.

The CLI tests reuse tests/test_client.py's signed repository served on 127.0.0.1 by a server that answers
with whatever index bytes a test signs with the repository's own key: each index below is validly signed, so
only the strict parse stands between it and the client."""
from __future__ import annotations

import json
import time

import pytest

from tests.test_client import base, client, one_line, seen  # noqa: F401 (fixtures)
from tmplbuild import strictjson
from tmplbuild.errors import AuthenticityError
from tmplbuild.repo import index as idx

GEN = 1_800_000_000


# -- strictjson ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("data, reason", [
    (b'{"a": 1, "a": 2}', "duplicate key 'a'"),
    (b'{"x": {"a": 1, "b": {"a": 2, "a": 3}}}', "duplicate key 'a'"),
    (b'[NaN]', "NaN is not a JSON number"),
    (b'{"v": Infinity}', "Infinity is not a JSON number"),
    (b'[-Infinity]', "-Infinity is not a JSON number"),
    (b'[1e400]', "overflows a float"),
    (b'"\xff"', "not UTF-8"),
    (b'\xef\xbb\xbf{}', "byte order mark"),
    (b'["\\ud800"]', "lone surrogate"),
    (b'[' * 100000, "nested deeper than"),
    (b'[' * 100000 + b']' * 100000, "nested deeper than"),
    (b'{"a":' * 100000 + b'1' + b'}' * 100000, "nested deeper than"),
    (b'[' * 33 + b']' * 33, "nested deeper than 32"),
    (b'1' * 5000, "not JSON"),
    (b'{"a": 1', "not JSON"),
])
def test_strict_loads_refuses(data, reason):
    with pytest.raises(strictjson.StrictJSONError) as info:
        strictjson.loads(data, what="doc")
    assert str(info.value).startswith("doc: ") and reason in str(info.value), str(info.value)


def test_strict_loads_accepts_ordinary_json_and_counts_no_brackets_inside_strings():
    assert strictjson.loads(b'[' * 32 + b']' * 32, what="d") is not None
    assert strictjson.loads(b'{"a": "[[[[{{{{", "b": "\\"[", "c": [1.5, -2, true, null]}', what="d") == \
        {"a": "[[[[{{{{", "b": '"[', "c": [1.5, -2, True, None]}
    assert strictjson.loads('{"name": "Grüße \\ud83d\\ude00"}'.encode(), what="d") == {"name": "Grüße 😀"}
    assert strictjson.loads(b'[[[]]]', what="d", max_depth=3) == [[[]]]
    with pytest.raises(strictjson.StrictJSONError):
        strictjson.loads(b'[[[[]]]]', what="d", max_depth=3)


# -- the index's integer ranges and types ------------------------------------------------------------------------

def _doc() -> dict:
    entry_files = [{"path": "templates/demo/1/demo_1_amd64.tar.zst", "size": 10, "sha256": "a" * 64,
                    "sha512": "b" * 128, "format": "tar.zst"}]
    return {"schema": 1, "repo_id": "r", "version": 5, "generated": idx.stamp(GEN), "expires": idx.stamp(GEN + 60),
            "templates": [{
                "name": "demo", "version": "1", "arch": "amd64", "distribution": "debian", "release": "12",
                "variant": "v", "description": "d", "created": idx.stamp(GEN), "input_hash": "h",
                "path": entry_files[0]["path"], "size": 10, "sha256": "a" * 64, "sha512": "b" * 128,
                "format": "tar.zst", "files": entry_files,
                "manifest": {"path": "templates/demo/1/demo_1_amd64.manifest.json", "size": 5, "sha256": "c" * 64}}]}


def _refused(doc: dict) -> str:
    with pytest.raises(AuthenticityError) as info:
        idx.parse(json.dumps(doc).encode())
    assert info.value.check == "index schema"
    return info.value.message


def _set(doc: dict, path: str, value) -> dict:
    *parents, last = path.split(".")
    target = doc
    for p in parents:
        target = target[int(p)] if p.isdigit() else target[p]
    target[last] = value
    return doc


@pytest.mark.parametrize("path, value", [
    ("version", 0), ("version", -1), ("version", 2**53), ("version", 10**30), ("version", True), ("version", 5.0),
    ("schema", True), ("schema", 1.0), ("schema", 2), ("schema", "1"),
    ("templates.0.files.0.size", -1), ("templates.0.files.0.size", 2**40 + 1), ("templates.0.files.0.size", False),
    ("templates.0.manifest.size", 2**40 + 1), ("templates.0.manifest.size", True),
    ("templates.0.size", 2**64), ("templates.0.size", True),
    ("generated", "2026-1-1T00:00:00Z"), ("expires", 1800000060),
])
def test_every_integer_of_the_index_has_a_range_and_bools_are_not_integers(path, value):
    idx.parse(json.dumps(_doc()).encode())  # the unmodified document parses
    _refused(_set(_doc(), path, value))


@pytest.mark.parametrize("key, value", [("path", "templates/demo/1/demo_1_amd64.tar.xz"), ("size", 11),
                                        ("sha256", "d" * 64), ("sha512", "e" * 128), ("format", "tar.xz")])
def test_the_primary_files_fields_repeated_in_an_entry_must_match_files_0(key, value):
    message = _refused(_set(_doc(), f"templates.0.{key}", value))
    assert f"templates[0].{key}" in message and "files[0]" in message


def test_the_range_ends_are_accepted():
    for path, value in (("version", 1), ("version", 2**53 - 1), ("templates.0.files.0.size", 0),
                        ("templates.0.files.0.size", 2**40), ("templates.0.manifest.size", 2**40)):
        doc = _set(_doc(), path, value)
        if path == "templates.0.files.0.size":
            doc["templates"][0]["size"] = value  # the primary file's size, repeated
        idx.parse(json.dumps(doc).encode())
    assert (idx.VERSION_MIN, idx.VERSION_MAX, idx.SIZE_MIN, idx.SIZE_MAX) == (1, 2**53 - 1, 0, 2**40)


def test_index_parse_is_strict_json():
    data = json.dumps(_doc()).encode()
    assert "duplicate key 'version'" in _refused_bytes(data.replace(b'"version": 5', b'"version": 5, "version": 6'))
    assert "NaN" in _refused_bytes(data.replace(b'"schema": 1', b'"schema": 1, "x": NaN'))
    assert "nested deeper" in _refused_bytes(b"[" * 100000 + b"]" * 100000)
    assert "not UTF-8" in _refused_bytes(data.replace(b'"description": "d"', b'"description": "\xff"'))


def _refused_bytes(data: bytes) -> str:
    with pytest.raises(AuthenticityError) as info:
        idx.parse(data)
    assert info.value.check == "index schema"
    return info.value.message


# -- through the real client: exit 3, nothing recorded --------------------------------------------------------

def _current_doc(client) -> dict:
    return json.loads((client.repo / "index.json").read_text())


def _serve_doc_text(client, text: bytes) -> None:
    client.serve_index(text)  # signed with the repository's own key


def _next(client, **changes) -> bytes:
    doc = _current_doc(client)
    doc.update({"version": 4, "generated": idx.stamp(time.time()), "expires": idx.stamp(time.time() + 3600),
                **changes})
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


@pytest.mark.parametrize("case", ["deep", "duplicate-version", "nan", "version-2**53", "size-2**40+1",
                                  "schema-true", "lifetime", "expires-before-generated"])
def test_a_signed_index_outside_the_schema_is_exit_3_and_state_is_untouched(client, case):  # noqa: F811
    before = seen(client)
    state_files = {p: p.read_bytes() for p in client.state.glob("*.json")}
    now = time.time()
    if case == "deep":  # was RecursionError: exit 1
        data = b"[" * 100000 + b"]" * 100000
    elif case == "duplicate-version":  # was read as the last one: version 4, accepted
        data = _next(client).replace(b'"version": 4', b'"version": 3, "version": 4')
    elif case == "nan":  # was accepted (an unknown field)
        data = _next(client).replace(b'"version": 4', b'"version": 4, "note": NaN')
    elif case == "version-2**53":  # was accepted and remembered: every later index a "rollback"
        data = _next(client, version=2**53)
    elif case == "size-2**40+1":
        doc = json.loads(_next(client))
        old = next(t for t in doc["templates"] if t["version"] != "12-20261130")
        old["files"][0]["size"] = old["size"] = 2**40 + 1
        data = json.dumps(doc).encode()
    elif case == "schema-true":  # True == 1 in Python
        data = _next(client, schema=True)
    elif case == "lifetime":
        data = _next(client, expires=idx.stamp(now + idx.MAX_LIFETIME + 86400))
    else:  # generated within the clock skew, expires before it, still in the future: was accepted
        data = _next(client, generated=idx.stamp(now + 200), expires=idx.stamp(now + 100))
    _serve_doc_text(client, data)
    for proc in (client.list(), client.fetch()):
        assert proc.returncode == 3, (case, proc.returncode, proc.stderr)
        one_line(proc, "index schema")
    assert client.snapshot() == before
    assert {p: p.read_bytes() for p in client.state.glob("*.json")} == state_files


def test_a_valid_index_at_the_range_end_is_accepted_and_recorded(client):  # noqa: F811
    seen(client)
    client.serve_index(_next(client, version=2**53 - 1))
    proc = client.list()
    assert proc.returncode == 0, proc.stderr
    assert client.state_doc()["version"] == 2**53 - 1


# -- the client's state file ------------------------------------------------------------------------------------

@pytest.mark.parametrize("edit", ["duplicate", "out-of-range", "bool", "deep"])
def test_a_state_file_that_is_not_strictly_valid_is_a_local_error(client, edit):  # noqa: F811
    seen(client)
    path = next(client.state.glob("*.json"))
    text = path.read_bytes()
    if edit == "duplicate":  # was read as version 3 (the last one)
        text = text.replace(b'"version": 3', b'"version": 99, "version": 3')
    elif edit == "out-of-range":
        text = text.replace(b'"version": 3', b'"version": 9007199254740992')
    elif edit == "bool":
        text = text.replace(b'"version": 3', b'"version": true')
    else:
        text = b"[" * 100000 + b"]" * 100000
    path.write_bytes(text)
    proc = client.list()
    assert proc.returncode == 7, proc.stderr
    assert "malformed" in one_line(proc, "state")
    assert path.read_bytes() == text
