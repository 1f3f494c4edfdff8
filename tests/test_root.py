"""The root of trust (tmplbuild.repo.root, tmplbuild.repo.chain) with real gpg and throwaway keys: TUF's rules for
a chain of roots, thresholds, rollback, expiry, and the online keys a root names (`keys`: conftest's seven
throwaway keys)."""
from __future__ import annotations

import pytest

from tmplbuild.errors import AuthenticityError, FreshnessError, SignatureError, UsageError
from tmplbuild.repo import chain as repochain
from tmplbuild.repo import root as rootdoc


def test_render_parses_back_with_the_keys_embedded(keys):
    data = keys.root(1, ("root-a", "root-b", "root-c"), ("online-1",), threshold=2)
    doc = rootdoc.parse(data)
    assert (doc.version, doc.root.threshold, doc.online.keys) == (1, 2, (keys["online-1"],))
    assert doc.key(keys["root-b"]).startswith(b"-----BEGIN PGP PUBLIC KEY BLOCK-----")
    assert doc.raw == data


def test_a_chain_of_three_roots_is_followed_with_2_of_3_thresholds(keys):
    abc, bcd = ("root-a", "root-b", "root-c"), ("root-b", "root-c", "root-d")
    one = keys.root(1, abc, ("online-1",), threshold=2)
    two = keys.root(2, abc, ("online-2",), threshold=2)
    three = keys.root(3, bcd, ("online-2",), threshold=2)
    served = {1: (one, keys.sign(one, "root-a", "root-c")),
              2: (two, keys.sign(two, "root-b", "root-c")),
              # rotating root-a out for root-d: two of the old keys (a, b) and two of the new set (b, d)
              3: (three, keys.sign(three, "root-a", "root-b", "root-d"))}
    trusted = rootdoc.check_self_signed(*served[1])
    chain = rootdoc.walk(trusted, served.get)
    assert [r.version for r in chain] == [2, 3]
    assert chain[-1].online.keys == (keys["online-2"],)
    # A client that pinned the root keys but holds no root yet finds the anchor and walks the same chain.
    anchored = rootdoc.anchor_and_walk([keys["root-a"], keys["root-c"]], served.get)
    assert [r.version for r in anchored] == [1, 2, 3]


def test_one_signature_of_a_2_of_3_root_is_not_enough(keys):
    abc = ("root-a", "root-b", "root-c")
    one = keys.root(1, abc, ("online-1",), threshold=2)
    trusted = rootdoc.check_self_signed(one, keys.sign(one, "root-a", "root-b"))
    two = keys.root(2, abc, ("online-2",), threshold=2)
    with pytest.raises(SignatureError) as err:
        rootdoc.check_successor(trusted, two, keys.sign(two, "root-a"))
    assert err.value.check == "root signature"
    assert "1 good signature(s) by the root keys of root 1" in err.value.message
    assert "expected 2 of" in err.value.message
    # the same key twice is still one key
    with pytest.raises(SignatureError):
        rootdoc.check_successor(trusted, two, keys.sign(two, "root-a", "root-a"))
    # a signature by a key the role does not name is not counted, and does not spoil good ones
    assert rootdoc.check_successor(trusted, two, keys.sign(two, "thief", "root-a", "root-c")).version == 2


def test_a_root_signed_only_by_its_new_keys_is_refused(keys):
    one = keys.root(1, ("root-a",), ("online-1",))
    trusted = rootdoc.check_self_signed(one, keys.sign(one, "root-a"))
    two = keys.root(2, ("thief",), ("thief",))
    with pytest.raises(SignatureError) as err:
        rootdoc.check_successor(trusted, two, keys.sign(two, "thief"))
    assert "by the root keys of root 1" in err.value.message
    # and one signed by the old keys only, not by its own new ones
    two = keys.root(2, ("root-d",), ("online-1",))
    with pytest.raises(SignatureError) as err:
        rootdoc.check_successor(trusted, two, keys.sign(two, "root-a"))
    assert "by its own root keys" in err.value.message


def test_a_root_that_rolls_back_its_version_is_refused(keys):
    one = keys.root(1, ("root-a",), ("online-1",))
    two = keys.root(2, ("root-a",), ("online-1",))
    trusted = rootdoc.check_successor(rootdoc.check_self_signed(one, keys.sign(one, "root-a")), two,
                                      keys.sign(two, "root-a"))
    # served as root/3.root.json, but it is the old root 1 (or 2), validly signed
    with pytest.raises(FreshnessError) as err:
        rootdoc.walk(trusted, {3: (one, keys.sign(one, "root-a"))}.get)
    assert err.value.check == "root rollback"
    skip = keys.root(5, ("root-a",), ("online-1",))
    with pytest.raises(AuthenticityError) as err:
        rootdoc.check_successor(trusted, skip, keys.sign(skip, "root-a"))
    assert err.value.check == "root version"


def test_an_expired_root_is_refused_but_expired_intermediate_roots_are_walked(keys):
    import time

    long_ago = time.time() - 10 * 86400
    one = keys.root(1, ("root-a",), ("online-1",), now=long_ago)  # expired 9 days ago
    trusted = rootdoc.check_self_signed(one, keys.sign(one, "root-a"))
    with pytest.raises(FreshnessError) as err:
        rootdoc.check_fresh(trusted)
    assert err.value.check == "root expired"
    two = keys.root(2, ("root-a",), ("online-1",))
    newest = rootdoc.walk(trusted, {2: (two, keys.sign(two, "root-a"))}.get)[-1]
    rootdoc.check_fresh(newest)


def test_pins_that_do_not_reach_the_threshold_anchor_nothing(keys):
    one = keys.root(1, ("root-a", "root-b"), ("online-1",), threshold=2)
    served = {1: (one, keys.sign(one, "root-a", "root-b"))}
    with pytest.raises(AuthenticityError) as err:
        rootdoc.anchor_and_walk([keys["root-a"]], served.get)
    assert err.value.check == "root pin"
    with pytest.raises(AuthenticityError) as err:
        rootdoc.anchor_and_walk([keys["thief"]], served.get)
    assert err.value.check == "root pin"
    with pytest.raises(AuthenticityError, match="no root/1.root.json"):
        rootdoc.anchor_and_walk([keys["root-a"]], {}.get)


def test_the_index_needs_a_threshold_of_the_online_keys_the_newest_root_names(keys):
    data = b'{"an": "index"}\n'
    one = rootdoc.parse(keys.root(1, ("root-a",), ("online-1", "online-2"), online_threshold=2))
    with rootdoc.RootVerifier(one) as verifier:
        assert verifier.verify(data, keys.sign(data, "online-1", "online-2")).fingerprint == keys["online-1"]
        with pytest.raises(SignatureError, match="1 good signature"):
            verifier.verify(data, keys.sign(data, "online-2"))
        with pytest.raises(SignatureError):
            verifier.verify(data, keys.sign(data, "online-1", "thief"))
    two = rootdoc.parse(keys.root(2, ("root-a",), ("online-2",)))
    with rootdoc.RootVerifier(two) as verifier:
        with pytest.raises(SignatureError, match="not pinned"):
            verifier.verify(data, keys.sign(data, "online-1"))  # dropped by root 2
        assert verifier.verify(data, keys.sign(data, "online-2")).fingerprint == keys["online-2"]


@pytest.mark.parametrize("bad", [b"", b"garbage", b"-----BEGIN PGP SIGNATURE-----\nAAAA\n-----END PGP SIGNATURE-----\n"])
def test_garbage_signature_files_are_refused_as_signatures(keys, bad):
    one = keys.root(1, ("root-a",), ("online-1",))
    with pytest.raises(SignatureError):
        rootdoc.check_self_signed(one, bad)
    with pytest.raises(SignatureError):
        rootdoc.check_self_signed(one, keys.sign(one, "root-a") + b"trailing junk")


@pytest.mark.parametrize("change, expected", [
    (lambda d: d.update(version=0), "version"),
    (lambda d: d.update(type="other"), "type"),
    (lambda d: d["roles"]["root"].update(threshold=3), "threshold"),
    (lambda d: d["roles"]["index"].update(keys=[]), "roles.index.keys"),
    (lambda d: d.update(extra=1), "unknown field"),
    (lambda d: d.update(expires="2999-01-01T00:00:00Z"), "expires - generated"),
    (lambda d: d["keys"].update({"A" * 40: {"public": "x"}}), "keys."),
])
def test_a_malformed_root_is_refused_naming_the_field(keys, change, expected):
    import json

    doc = json.loads(keys.root(1, ("root-a", "root-b"), ("online-1",)))
    change(doc)
    with pytest.raises(AuthenticityError) as err:
        rootdoc.parse(json.dumps(doc).encode())
    assert err.value.check == "root schema"
    assert expected in err.value.message


def test_render_refuses_what_parse_would(keys):
    with pytest.raises(UsageError):
        rootdoc.role([keys["root-a"]], 2, "root keys")
    with pytest.raises(UsageError):
        keys.root(1, ("root-a",), ("online-1",), expires_in=rootdoc.MAX_LIFETIME + 1)


def test_a_repository_directory_installs_and_reads_its_chain(keys, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    one = keys.root(1, ("root-a", "root-b"), ("online-1",), threshold=2)
    with pytest.raises(SignatureError):
        repochain.install(repo, one, keys.sign(one, "root-a"))
    assert not (repo / "root").exists() or not list((repo / "root").iterdir())
    doc, lines = repochain.install(repo, one, keys.sign(one, "root-a", "root-b"))
    assert doc.version == 1 and (repo / "keys" / f"{keys['online-1']}.asc").exists()
    two = keys.root(2, ("root-a", "root-b"), ("online-2",), threshold=2)
    with pytest.raises(SignatureError):
        repochain.install(repo, two, keys.sign(two, "online-1"))
    assert not (repo / "root/2.root.json").exists()
    repochain.install(repo, two, keys.sign(two, "root-a", "root-b"))
    assert not (repo / "keys" / f"{keys['online-1']}.asc").exists()
    trust = repochain.repo_trust(repo)
    assert [r.version for r in trust.chain] == [1, 2]
    with pytest.raises(AuthenticityError, match="not an online key of root 2"):
        trust.check_signer(keys["online-1"])
    # a tampered root in the tree breaks the chain for everyone reading it
    (repo / "root/2.root.json").write_bytes(two.replace(b'"threshold": 1', b'"threshold": 1 '))
    with pytest.raises(SignatureError):
        repochain.repo_trust(repo)
