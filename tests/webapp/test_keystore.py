"""The API keys file and `KeyStore`: the shipped example, errors that name the entry but never
echo a token, and live reload (after `interval`, on request, and keeping the old keys after a bad
edit)."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

import pytest

from webapp.keystore import (
    SCOPES,
    KeysFileError,
    KeyStore,
    parse_keys,
    read_keys_file,
    token_digest,
)

EXAMPLE_KEYS = Path(__file__).resolve().parents[2] / "config" / "example.keys.json"
SECRET = "very-secret-token-value-0123456789"
OTHER_SECRET = "another-secret-token-value-98765"


def by_token(keys: dict, token: str):
    return keys.get(token_digest(token))


# ---------------------------------------------------------------- the example file


def test_example_keys_file():
    keys = read_keys_file(EXAMPLE_KEYS)
    for scope in SCOPES:
        key = by_token(keys, f"example-{scope}-token")
        assert key is not None, scope
        assert key.scopes == frozenset({scope})
        assert key.name == f"example-{scope}"
        assert key.allows_model("any/model")

    everything = [k for k in keys.values() if k.scopes == frozenset(SCOPES)]
    assert [k.name for k in everything] == ["example-admin"]
    assert by_token(keys, "example-admin-token") is everything[0]

    limited = by_token(keys, "example-limited-token")  # kept in the file only as its sha256
    assert limited is not None and limited.name == "example-limited"
    assert limited.scopes == frozenset({"realtime"})
    assert limited.models == frozenset({"mistralai/Mistral-7B-Instruct-v0.1"})
    assert limited.allows_model("mistralai/Mistral-7B-Instruct-v0.1")
    assert not limited.allows_model("synquid/gemma-3-27b-it-FP8")
    assert (limited.requests_per_minute, limited.max_concurrency) == (60, 4)
    (raw,) = [k for k in json.loads(EXAMPLE_KEYS.read_text())["keys"]
              if k["name"] == "example-limited"]
    assert "token" not in raw and raw["sha256"] == token_digest("example-limited-token")
    assert by_token(keys, "not-a-token") is None
    assert len(keys) == 7
    assert {k.project for k in keys.values()} == {"default"}  # no project named: default


def test_a_key_names_its_project(tmp_path: Path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [entry("a", token=SECRET, project="team-a.prod"),
                                         entry("b", token=OTHER_SECRET)]}))
    keys = read_keys_file(path)
    assert by_token(keys, SECRET).project == "team-a.prod"
    assert by_token(keys, OTHER_SECRET).project == "default"


# ---------------------------------------------------------------- bad files


def entry(name: str, **values) -> dict:
    return {"name": name, "scopes": ["realtime"], **values}


GOOD = entry("good", token=OTHER_SECRET)

BAD_ENTRIES = [
    ("token and sha256", [GOOD, entry("both", token=SECRET, sha256=token_digest(SECRET))],
     1, "both", "exactly one of token or sha256"),
    ("neither token nor sha256", [entry("neither")], 0, "neither",
     "exactly one of token or sha256"),
    ("unknown scope", [GOOD, entry("scoped", token=SECRET, scopes=["realtime", "admin"])],
     1, "scoped", "scopes"),
    ("no scopes", [entry("empty", token=SECRET, scopes=[])], 0, "empty", "scopes"),
    ("short token", [entry("short", token="abc")], 0, "short", "token"),
    ("sha256 not hex", [entry("hexless", sha256=SECRET)], 0, "hexless", "64 hex digits"),
    ("unknown field", [entry("typo", token=SECRET, tokn=SECRET)], 0, "typo", "tokn"),
    ("duplicate name", [entry("twin", token=OTHER_SECRET), entry("twin", token=SECRET)],
     1, "twin", "duplicate name"),
    ("duplicate token", [GOOD, entry("copy", token=OTHER_SECRET)], 1, "copy",
     "same token as another entry"),
    ("project with a slash", [entry("slash", token=SECRET, project="a/b")], 0, "slash",
     "project"),
    ("project not a string", [entry("num", token=SECRET, project=7)], 0, "num", "project"),
    ("budget not a number", [entry("spender", token=SECRET, tokens_per_day="lots")], 0,
     "spender", "tokens_per_day"),
    ("budget of zero", [entry("stingy", token=SECRET, requests_per_day=0)], 0, "stingy",
     "requests_per_day"),
    ("duplicate token given as its sha256",
     [GOOD, entry("hashed", sha256=token_digest(OTHER_SECRET))], 1, "hashed",
     "same token as another entry"),
]


@pytest.mark.parametrize(("entries", "index", "name", "complaint"),
                         [case[1:] for case in BAD_ENTRIES], ids=[case[0] for case in BAD_ENTRIES])
def test_bad_entry_is_named_and_no_token_leaks(tmp_path: Path, entries, index, name, complaint):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": entries}))
    with pytest.raises(KeysFileError) as error:
        read_keys_file(path)
    message = str(error.value)
    assert f"entry {index} ('{name}')" in message
    assert complaint in message
    assert str(path) in message
    for secret in (SECRET, OTHER_SECRET, token_digest(SECRET), token_digest(OTHER_SECRET)):
        assert secret not in message


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("{ this is not json", "not valid JSON"),
        ('{"tokens": []}', 'expected {"keys": [...]}'),
        ('{"keys": {"a": 1}}', 'expected {"keys": [...]}'),
        ("[]", 'expected {"keys": [...]}'),
        ('{"keys": ["just-a-token-string"]}', "entry 0: expected an object"),
    ],
)
def test_unusable_file(tmp_path: Path, text: str, complaint: str):
    path = tmp_path / "keys.json"
    path.write_text(text)
    with pytest.raises(KeysFileError) as error:
        read_keys_file(path)
    assert complaint in str(error.value)
    assert str(path) in str(error.value)
    assert "just-a-token-string" not in str(error.value)


def test_missing_file(tmp_path: Path):
    with pytest.raises(KeysFileError, match="cannot read"):
        KeyStore(tmp_path / "absent.json")


def test_budgets_of_a_key_and_of_its_project():
    keys = parse_keys({"keys": [entry("a", token=SECRET, tokens_per_minute=100, project="p"),
                                entry("b", token=OTHER_SECRET, project="p")],
                       "projects": {"p": {"requests_per_day": 50}}}, "inline")
    a, b = by_token(keys, SECRET), by_token(keys, OTHER_SECRET)
    assert [(x.scope, x.name, x.tokens_per_minute, x.requests_per_day) for x in a.budgets] == [
        ("key", "a", 100, None), ("project", "p", None, 50)]
    assert [(x.scope, x.requests_per_day) for x in b.budgets] == [("project", 50)]


@pytest.mark.parametrize(("projects", "complaint"), [
    ([], '"projects" must be an object'),
    ({"p": {"tokens_per_day": -1}}, "project 'p'"),
    ({"p": {"tokens_per_dya": 5}}, "tokens_per_dya"),
    ({"p": 7}, "project 'p'"),
])
def test_bad_project_budgets_are_named(projects, complaint):
    with pytest.raises(KeysFileError, match=re.escape(complaint)):
        parse_keys({"keys": [entry("x", token=SECRET)], "projects": projects}, "inline")


def test_parse_keys_names_the_source():
    with pytest.raises(KeysFileError, match="inline: entry 0"):
        parse_keys({"keys": [entry("x")]}, "inline")


# ---------------------------------------------------------------- live reload


def write_keys(path: Path, *entries: dict) -> None:
    """Replace the file atomically, as an editor or a config tool does."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"keys": list(entries)}))
    tmp.replace(path)


INTERVAL = 0.1


def test_lookup_rereads_a_changed_file_after_the_interval(tmp_path: Path):
    path = tmp_path / "keys.json"
    write_keys(path, entry("old", token="token-old-0001"))
    created = time.monotonic()
    store = KeyStore(path, interval=INTERVAL)
    assert store.lookup("token-old-0001").name == "old"

    write_keys(path, entry("new", token="token-new-0001", scopes=["batch"]))
    if time.monotonic() - created < INTERVAL * 0.8:
        # Within the interval the file is not even looked at.
        assert store.lookup("token-new-0001") is None
        assert store.lookup("token-old-0001") is not None
    time.sleep(INTERVAL * 1.5)
    new = store.lookup("token-new-0001")
    assert new is not None and new.scopes == frozenset({"batch"})
    assert store.lookup("token-old-0001") is None


def test_bad_edit_keeps_the_previous_keys(tmp_path: Path, caplog):
    path = tmp_path / "keys.json"
    write_keys(path, entry("kept", token="token-kept-0001"))
    store = KeyStore(path, interval=INTERVAL)

    caplog.set_level(logging.ERROR, logger="webapp.keystore")
    for bad in ("{ not json", json.dumps({"keys": [entry("x", token=SECRET), entry("x")]})):
        path.write_text(bad)
        time.sleep(INTERVAL * 1.5)
        assert store.lookup("token-kept-0001").name == "kept"
        assert store.lookup(SECRET) is None
    logged = caplog.text
    assert "keeping the previous keys" in logged
    assert "not valid JSON" in logged and "entry 1 ('x')" in logged
    assert SECRET not in logged

    write_keys(path, entry("fixed", token="token-fixed-001"))  # a good edit is picked up again
    time.sleep(INTERVAL * 1.5)
    assert store.lookup("token-fixed-001").name == "fixed"
    assert store.lookup("token-kept-0001") is None


def test_request_reload_rereads_an_unchanged_stamp(tmp_path: Path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [entry("a", token="token-aaaa-0001")]}))
    store = KeyStore(path, interval=INTERVAL)
    assert store.lookup("token-aaaa-0001") is not None

    # Same inode, same size, same mtime: the stamp cannot tell the file changed.
    stat = os.stat(path)
    with open(path, "r+") as fh:
        fh.write(json.dumps({"keys": [entry("b", token="token-bbbb-0001")]}))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        stat.st_ino, stat.st_size, stat.st_mtime_ns,
    )
    time.sleep(INTERVAL * 1.5)
    assert store.lookup("token-bbbb-0001") is None  # the interval alone does not re-read
    assert store.lookup("token-aaaa-0001") is not None

    store.request_reload()
    assert store.lookup("token-bbbb-0001").name == "b"
    assert store.lookup("token-aaaa-0001") is None
