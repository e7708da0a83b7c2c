"""The proposer → API side channel: records reach their own request, nothing lingers, and
nothing but well-formed messages gets in (no pickle; malformed bytes are dropped and counted)."""

from __future__ import annotations

import asyncio
import math
import os
import pickle
import stat

import msgspec
import numpy as np
import pytest
import zmq

from server.engine import eu_wire
from server.engine.eu_channel import Joiner, Publisher, external_id
from server.engine.eu_wire import Record, RequestRecords


def _rec(pos: int, var: float) -> Record:
    return Record.of_top_n(pos, var, np.array([3, 4], dtype=np.int32), np.array([0.6, 0.3], dtype=np.float32))


def test_records_join_by_request_and_position(tmp_path):
    address = f"ipc://{tmp_path}/eu"

    async def scenario():
        joiner = Joiner(address)
        try:
            joiner.register("a")
            joiner.register("b")
            pub = Publisher(address)
            pub.send(
                2,
                [
                    RequestRecords("a-1234abcd", 3, 3, 2, 0.5, [_rec(10, 0.1), _rec(11, 0.2)]),
                    RequestRecords("b-99999999", 3, 3, 0, 0.1, [_rec(10, 0.7), Record.exact(11, 0.3, 0.25)]),
                    RequestRecords("gone-00000000", 3, 3, 0, 0.1, [_rec(5, 9.9)]),
                ],
            )
            a11 = await joiner.record("a", 11, timeout=5)
            b10 = await joiner.record("b", 10, timeout=5)
            b11 = await joiner.record("b", 11, timeout=5)  # a worker-side bias record
            missing = await joiner.record("a", 12, timeout=0.2)
            stats = joiner.stats("a")
            joiner.release("a")
            joiner.release("b")
            return a11, b10, b11, missing, stats, joiner.num_requests(), joiner.proposer_states
        finally:
            joiner.close()

    a11, b10, b11, missing, stats, n_left, live = asyncio.run(scenario())
    assert a11.variance == 0.2 and b10.variance == 0.7
    assert a11.top_n()[0].tolist() == [3, 4] and a11.bias is None
    assert (b11.variance, b11.bias, b11.ids) == (0.3, 0.25, None)
    assert missing is None
    assert stats == (1, 3, 3, 2, 0.5)
    assert n_left == 0 and live == 2


def test_external_id_strips_vllms_suffix():
    assert external_id("req-7-abcdef12") == "req-7"


# --- the wire format


def test_wire_round_trip_of_both_record_kinds():
    ids, probs = np.array([3, 4, 9], dtype=np.int32), np.array([0.5, 0.25, 0.125], dtype=np.float32)
    data = eu_wire.encode(
        2,
        [
            RequestRecords(
                "r-1",
                3,
                3,
                1,
                0.25,
                [
                    Record.exact(7, 0.5, 0.125),
                    Record.exact(8, 0.25, None),
                    Record.exact(9, float("nan"), float("inf")),
                ],
            ),
            RequestRecords("s-2", 1, 0, 0, 0.0, [Record.of_top_n(4, 0.75, ids, probs)]),
        ],
    )
    msg = eu_wire.decode(data, vocab_size=10)
    assert msg.live == 2 and [r.req_id for r in msg.reqs] == ["r-1", "s-2"]
    r, s = msg.reqs
    assert (r.passes, r.proposed, r.accepted, r.eu_seconds) == (3, 3, 1, 0.25)
    assert [(x.position, x.variance, x.bias) for x in r.records] == [
        (7, 0.5, 0.125),
        (8, 0.25, None),
        (9, None, None),
    ]
    got_ids, got_probs = s.records[0].top_n()
    assert got_ids.tolist() == [3, 4, 9] and got_probs.tolist() == [0.5, 0.25, 0.125]
    assert got_ids.flags.writeable  # torch.from_numpy takes it without a copy or a warning


def _raw(*reqs, live=1, version=1) -> bytes:
    """A message built by hand, bypassing the encoder's types."""
    return msgspec.msgpack.encode([version, live, list(reqs)])


def _i32(*xs) -> bytes:
    return np.array(xs, dtype="<i4").tobytes()


def _f32(*xs) -> bytes:
    return np.array(xs, dtype="<f4").tobytes()


class _Boom:
    """Unpickling this would create `marker`."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _hostile(marker: str) -> dict[str, bytes]:
    ok = ["a-00000000", 1, 1, 1, 0.0]
    return {
        "pickle": pickle.dumps({"live": 1, "reqs": [_Boom(marker)]}),
        "pickle of a valid-looking dict": pickle.dumps({"live": 1, "reqs": []}),
        "garbage": os.urandom(64),
        "empty": b"",
        "not an array": msgspec.msgpack.encode({"live": 1, "reqs": []}),
        "wrong version": _raw(version=2),
        "negative live": _raw(live=-1),
        "string count": _raw([*ok[:1], "3", *ok[2:], []]),
        "missing field": _raw(ok[:4]),
        "extra field": _raw([*ok, [], "x"]),
        "nan variance": _raw([*ok, [[1, float("nan"), None]]]),
        "inf bias": _raw([*ok, [[1, 0.1, float("inf")]]]),
        "inf eu_seconds": _raw([*ok[:4], float("inf"), []]),
        "huge position": _raw([*ok, [[1 << 40, 0.1, None]]]),
        "huge int": b"\x93\x01\x01\x91\x96\xa1a\xcf" + b"\xff" * 8 + b"\x01\x01\x00\x90",
        "empty request id": _raw(["", *ok[1:], []]),
        "long request id": _raw(["x" * 5000, *ok[1:], []]),
        "ids out of the vocabulary": _raw([*ok, [[1, 0.1, None, _i32(3, 99), _f32(0.5, 0.5)]]]),
        "negative id": _raw([*ok, [[1, 0.1, None, _i32(-1), _f32(0.5)]]]),
        "ids without probs": _raw([*ok, [[1, 0.1, None, _i32(3), None]]]),
        "lengths differ": _raw([*ok, [[1, 0.1, None, _i32(3, 4), _f32(0.5)]]]),
        "odd buffer": _raw([*ok, [[1, 0.1, None, b"\x01\x02\x03", b"\x01\x02\x03"]]]),
        "probability above 1": _raw([*ok, [[1, 0.1, None, _i32(3), _f32(7.0)]]]),
        "nan probability": _raw([*ok, [[1, 0.1, None, _i32(3), _f32(float("nan"))]]]),
        "bias and top-N": _raw([*ok, [[1, 0.1, 0.2, _i32(3), _f32(0.5)]]]),
        "claims 2**32 requests": b"\x93\x01\x01\xdd\xff\xff\xff\xff",
        "too many records": _raw([*ok, [[1, 0.1, None]] * (eu_wire.MAX_RECORDS + 1)]),
        "deep nesting": b"\x93\x01\x01" + b"\x91" * 100_000,
        "extension type": _raw([*ok, [[1, msgspec.msgpack.Ext(1, b"x"), None]]]),
    }


def test_malformed_messages_raise_wire_error(tmp_path):
    for name, data in _hostile(str(tmp_path / "pwned")).items():
        with pytest.raises(eu_wire.WireError):
            eu_wire.decode(data, vocab_size=10)
            pytest.fail(f"accepted: {name}")
    assert not (tmp_path / "pwned").exists()


def test_the_joiner_drops_and_counts_hostile_messages_and_keeps_working(tmp_path):
    marker = tmp_path / "pwned"
    hostile = _hostile(str(marker))

    async def scenario():
        joiner = Joiner(vocab_size=10)
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(joiner.address)
        try:
            joiner.register("a")
            for data in hostile.values():
                push.send(data)
            push.send(
                eu_wire.encode(1, [RequestRecords("a-1234abcd", 2, 3, 1, 0.5, [Record.exact(4, 0.25, 0.5)])])
            )
            rec = await joiner.record("a", 4, timeout=10)
            return rec, joiner.dropped, joiner.stats("a")
        finally:
            push.close()
            joiner.close()

    rec, dropped, stats = asyncio.run(scenario())
    assert (rec.variance, rec.bias) == (0.25, 0.5)  # messages are ordered on one connection
    assert dropped == len(hostile)
    assert stats == (1, 2, 3, 1, 0.5)  # nothing of the hostile messages was filed
    assert not marker.exists()


def test_a_nan_variance_travels_as_none_and_arrives_as_nan():
    msg = eu_wire.decode(
        eu_wire.encode(0, [RequestRecords("a-1", 1, 0, 0, 0.0, [Record.exact(1, float("nan"), None)])])
    )
    rec = msg.reqs[0].records[0]
    assert rec.variance is None
    assert math.isnan(rec.variance_or_nan()) and rec.bias is None


def test_the_socket_lives_in_a_private_directory_unique_per_joiner():
    a, b = Joiner(), Joiner()
    try:
        folders = [os.path.dirname(j.address.removeprefix("ipc://")) for j in (a, b)]
        assert folders[0] != folders[1]
        for folder, j in zip(folders, (a, b), strict=True):
            assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
            assert os.stat(folder).st_uid == os.getuid()
            assert stat.S_IMODE(os.stat(j.address.removeprefix("ipc://")).st_mode) == 0o600
    finally:
        a.close()
        b.close()
    assert not any(os.path.exists(f) for f in folders)


def test_the_proposers_fault_count_travels_in_every_message(tmp_path):
    """A message without the count (an older proposer) reads as 0 faults; the joiner keeps the
    count of the last message, which the publisher carries in every one."""
    assert eu_wire.decode(_raw(live=0)).faults == 0
    address = f"ipc://{tmp_path}/eu"

    async def scenario():
        joiner = Joiner(address)
        try:
            joiner.register("a")
            pub = Publisher(address)
            pub.faults = 3
            pub.send(0, [RequestRecords("a-1234abcd", 0, 0, 0, 0.0, [Record.exact(5, float("nan"), None)])])
            rec = await joiner.record("a", 5, timeout=5)
            return rec, joiner.proposer_faults
        finally:
            joiner.close()

    rec, faults = asyncio.run(scenario())
    assert faults == 3 and rec.variance is None and rec.bias is None
