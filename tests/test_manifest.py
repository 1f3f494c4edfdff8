"""The typed manifest: what the builder writes reads back as the same value, byte for byte, and a manifest that
two JSON readers could read differently, or that names a file outside its directory, is refused."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from tmplbuild.manifest import Manifest, ManifestArtifact, ManifestError, Package, parse

ART = ManifestArtifact("t_1_amd64.tar.zst", "tar.zst", 10, "a" * 64, "b" * 128)
M = Manifest("t", "1", "amd64", distribution="debian", release="12", created="2026-12-01T00:00:00Z",
             source_date_epoch=1, build={"input_hash": "sha256:" + "0" * 64}, packages=(Package("a", "1", "amd64"),),
             artifacts=(ART,), extra={"future_field": [1, 2]})


def test_round_trip_keeps_every_field_and_unknown_ones():
    assert parse(M.to_bytes()) == M
    tested = replace(M, test={"result": "pass"})
    assert parse(tested.to_bytes()).test == {"result": "pass"} and M.test is None
    assert json.loads(M.to_bytes())["future_field"] == [1, 2]
    with pytest.raises(AttributeError):
        M.name = "other"  # frozen


@pytest.mark.parametrize("mutate, field", [
    (lambda t: t.replace('"name": "t"', '"name": "t", "name": "evil"'), "duplicate key"),
    (lambda t: t.replace('"file": "t_1_amd64.tar.zst"', '"file": "../../etc/shadow"'), "file"),
    (lambda t: t.replace('"size": 10', '"size": -1'), "size"),
    (lambda t: t.replace('"size": 10', '"size": true'), "size"),
    (lambda t: t.replace('"source_date_epoch": 1', '"source_date_epoch": NaN'), "NaN"),
    (lambda t: t.replace('"future_field": [', '"future_field": ' + "[" * 5000) + "]" * 5000, "deep"),
])
def test_refused(mutate, field):
    text = mutate(M.to_bytes().decode())
    with pytest.raises(ManifestError) as exc:
        parse(text.encode())
    assert field.split()[0] in str(exc.value).lower() or field in str(exc.value), str(exc.value)
