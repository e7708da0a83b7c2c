"""The proposer → API side channel: records reach their own request, and nothing lingers."""

from __future__ import annotations

import asyncio

import numpy as np

from server.engine.eu_channel import Joiner, Publisher, external_id


def _rec(pos: int, var: float):
    return (pos, var, np.array([3, 4], dtype=np.int32), np.array([0.6, 0.3], dtype=np.float32))


def test_records_join_by_request_and_position(tmp_path):
    address = f"ipc://{tmp_path}/eu"

    async def scenario():
        joiner = Joiner(address)
        try:
            joiner.register("a")
            joiner.register("b")
            pub = Publisher(address)
            pub.send({"live": 2, "reqs": [("a-1234abcd", 3, 3, 2, 0.5, [_rec(10, 0.1), _rec(11, 0.2)]),
                                          ("b-99999999", 3, 3, 0, 0.1, [_rec(10, 0.7), (11, 0.3, 0.25)]),
                                          ("gone-00000000", 3, 3, 0, 0.1, [_rec(5, 9.9)])]})
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
    assert list(a11.ids) == [3, 4] and a11.bias is None
    assert (b11.variance, b11.bias, b11.ids) == (0.3, 0.25, None)
    assert missing is None
    assert stats == (1, 3, 3, 2, 0.5)
    assert n_left == 0 and live == 2


def test_external_id_strips_vllms_suffix():
    assert external_id("req-7-abcdef12") == "req-7"
