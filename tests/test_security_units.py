"""The auth file's checks, key hashing and matching, and the audit log's bucket."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from opscore.errors import ConfigError
from opscore.security import authfile, keys
from opscore.security.audit import AuthFailures
from opscore.security.principal import Principal
from opscore.security.roles import Role

H1 = keys.hash_key("k1")
H2 = keys.hash_key("k2")


def test_keys_are_random_and_only_their_hash_matches():
    a, b = keys.generate_key(), keys.generate_key()
    assert a != b and a.startswith("opsk_") and len(a) >= 40
    assert keys.is_key_hash(keys.hash_key(a)) and not keys.is_key_hash(a)
    table = keys.KeyTable([(keys.digest(a), "A"), (keys.digest(b), "B")])
    assert table.match(keys.digest(a)) == "A"
    assert table.match(keys.digest(b)) == "B"
    assert table.match(keys.digest(a[:-1])) is None
    # Keyed: not the plain SHA-256 of the key.
    import hashlib

    assert keys.hash_key(a) != "sha256:" + hashlib.sha256(a.encode()).hexdigest()


def test_allowance_patterns():
    p = Principal("fleet", Role.AGENT, ("summarizer-*", "exact"))
    assert p.allows_agent("summarizer-1") and p.allows_agent("exact")
    assert not p.allows_agent("Summarizer-1")  # case-sensitive
    assert not p.allows_agent("exact-2") and not p.allows_agent("")
    assert Principal("root", Role.ADMIN).allows_agent("anything")


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_round_trip_in_both_formats(tmp_path: Path, suffix: str):
    entries = [
        authfile.Entry("fleet", Role.AGENT, ("summarizer-*",), None, (H1,)),
        authfile.Entry("ci", Role.OPERATOR, None, 'O=Acme "x",CN=ci', (H2,)),
    ]
    path = tmp_path / f"auth{suffix}"
    authfile.save(path, entries)
    assert authfile.load(path) == entries
    assert "Keys are stored as hashes only" in path.read_text()


BAD = [
    ({"principals": [{"name": "a", "role": "wizard", "key_hashes": [H1]}]}, "role must be"),
    ({"principals": [{"name": "a", "role": "agent", "key_hashes": [H1]}]}, "needs 'agents'"),
    (
        {"principals": [{"name": "a", "role": "viewer", "agents": ["x"], "key_hashes": [H1]}]},
        "applies to role agent only",
    ),
    ({"principals": [{"name": "a", "role": "admin", "key_hashes": ["opsk_raw"]}]}, "hashes only"),
    ({"principals": [{"name": "a", "role": "admin", "key_hash": H1}]}, "unknown field"),
    ({"principals": [{"name": "a", "role": "admin"}]}, "neither key_hashes nor subject"),
    ({"principals": [{"name": "a b", "role": "admin", "key_hashes": [H1]}]}, "name must be"),
    (
        {
            "principals": [
                {"name": "a", "role": "admin", "key_hashes": [H1]},
                {"name": "a", "role": "viewer", "key_hashes": [H2]},
            ]
        },
        "two principals are named",
    ),
    (
        {
            "principals": [
                {"name": "a", "role": "admin", "key_hashes": [H1]},
                {"name": "b", "role": "viewer", "key_hashes": [H1]},
            ]
        },
        "share the key",
    ),
    (
        {
            "principals": [
                {"name": "a", "role": "admin", "subject": "CN=x"},
                {"name": "b", "role": "viewer", "subject": "CN=x"},
            ]
        },
        "same subject",
    ),
    ({"users": []}, "one key, 'principals'"),
]


@pytest.mark.parametrize(("data", "message"), BAD)
def test_wrong_entries_are_refused_with_a_reason(data, message):
    with pytest.raises(ConfigError, match=message):
        authfile.parse(data)


def test_unreadable_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="must end in"):
        authfile.load(tmp_path / "auth.json")
    with pytest.raises(ConfigError, match="cannot read auth file"):
        authfile.load(tmp_path / "absent.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[[principals]\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        authfile.load(broken)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert authfile.load(empty) == []


def test_audit_bucket_bounds_lines_and_counts_everything(caplog):
    now = [0.0]
    audit = AuthFailures(burst=3, per_second=1.0, summary_interval=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="opscore.security.audit"):
        for _ in range(100):
            audit.record("API_KEY_INVALID", "ipv4:1.2.3.4:5", "/m")
        assert len(caplog.records) == 3
        now[0] += 2.0  # two lines' worth of refill
        for _ in range(100):
            audit.record("API_KEY_MISSING", "ipv4:1.2.3.4:5", "/m")
        assert len(caplog.records) == 5
        audit.close()
    assert audit.total == 200
    assert audit.by_reason == {"API_KEY_INVALID": 100, "API_KEY_MISSING": 100}
    # What was not logged one by one is summed up (here by close(), at shutdown).
    summary = caplog.records[-1]
    assert summary.getMessage().startswith("authentication failures not logged")
    assert summary.unlogged == 195 and summary.failed_total == 200
