"""DDD partitions: disjoint, covering, balanced, order-independent, duplicates kept together."""

from __future__ import annotations

import random

import pytest

from drafts.corpus import text_hash
from drafts.ddd import describe, partition


def test_partitions_are_disjoint_and_cover(texts):
    parts = partition(texts, 4)
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(len(texts)))  # covering, and no index twice
    hashes = [{text_hash(texts[i]) for i in p} for p in parts]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not hashes[a] & hashes[b]  # disjoint by content, not only by index
    sizes = [len(h) for h in hashes]
    assert max(sizes) - min(sizes) <= 1


def test_duplicates_land_in_one_partition(texts):
    doubled = texts + texts[:10]
    parts = partition(doubled, 3)
    where = {}
    for m, p in enumerate(parts):
        for i in p:
            assert where.setdefault(doubled[i], m) == m


def test_membership_does_not_depend_on_order(texts):
    shuffled = texts[:]
    random.Random(0).shuffle(shuffled)
    a = [sorted(texts[i] for i in p) for p in partition(texts, 4)]
    b = [sorted(shuffled[i] for i in p) for p in partition(shuffled, 4)]
    assert a == b


def test_without_ddd_every_draft_sees_everything(texts):
    parts = partition(texts, 3, enabled=False)
    assert all(p == list(range(len(texts))) for p in parts)
    rec = describe(texts, parts[0], 0, 3, enabled=False)
    assert rec["partition"] is None and rec["documents"] == len(texts)


def test_record_holds_hashes_and_digest(texts):
    parts = partition(texts, 2)
    r0, r1 = (describe(texts, p, m, 2, True) for m, p in enumerate(parts))
    assert set(r0["hashes"]).isdisjoint(r1["hashes"])
    assert len(r0["hashes"]) + len(r1["hashes"]) == len(set(texts))
    assert r0["digest"] != r1["digest"]


@pytest.mark.parametrize(
    ("texts_", "m", "message"),
    [
        (["a", "b"], 0, "at least 1"),
        ([], 2, "empty corpus"),
        (["a", "a", "b"], 3, "too few"),
    ],
)
def test_bad_inputs(texts_, m, message):
    with pytest.raises(ValueError, match=message):
        partition(texts_, m)
