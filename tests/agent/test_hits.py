"""``Hits``: a lookup's cached run as columns, read as ``Hit``s where a caller wants them."""

from __future__ import annotations

import array

import pytest

from kvmarina.agent.client import NO_HITS, Hit, Hits


def hits(tiers: bytes | None = None) -> Hits:
    return Hits([b"a", b"b", b"c"], array.array("I", [4, 4, 7]), array.array("I", [0, 1, 2]), tiers)


def test_columns_read_as_hits_in_order() -> None:
    got = hits()
    assert len(got) == 3 and got[1] == Hit(b"b", 4, 1, "device")
    assert list(got) == [
        Hit(b"a", 4, 0, "device"),
        Hit(b"b", 4, 1, "device"),
        Hit(b"c", 7, 2, "device"),
    ]
    assert list(got.slots()) == [(4, 0), (4, 1), (7, 2)]
    assert got[-1].hash == b"c" and got[-1].index == 2


def test_tiers_per_hit_when_not_all_device() -> None:
    got = hits(b"dhd")
    assert [h.tier for h in got] == ["device", "host", "device"]
    assert got.tier(1) == "host" and got[1:].tier(0) == "host"


def test_slices_keep_every_column() -> None:
    tail = hits(b"dhd")[1:]
    assert isinstance(tail, Hits) and tail.hashes == [b"b", b"c"]
    assert list(tail.slots()) == [(4, 1), (7, 2)] and tail.tiers == b"hd"


def test_equal_to_the_list_of_its_hits() -> None:
    assert NO_HITS == [] and hits() == list(hits()) and hits() == hits()
    assert hits() != [] and hits() != hits()[:2] and hits(b"dhd") != hits()
    assert hits() != "abc"


def test_columns_of_different_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        Hits([b"a"], [1, 2], [0])
    with pytest.raises(ValueError, match="differ in length"):
        Hits([b"a"], [1], [0], b"dd")
