"""The two ends of the side channel as processes, for tests that put them in separate network
namespaces (test_eu_channel_netns.py). Keys travel as on a real server: made by the joiner
(the API side), handed to the publisher over a pipe (here: stdout to the test, the test to the
publisher's stdin), never on a command line.

    python -m tests.server.engine.eu_peer joiner tcp://10.231.0.1:0 N
        prints {"address", "keys"}, waits for the records of positions 0..N-1 of request "r",
        then for a refused handshake, and prints {"delivered", "rejected", "intruder_filed", ...}
    python -m tests.server.engine.eu_peer publisher N      (stdin: the joiner's first line)
        sends N messages, one record each, as the proposer does, then waits for stdin to close
    python -m tests.server.engine.eu_peer intruder N       (stdin: the joiner's first line)
        the same with a key pair of its own (it knows the server's public key)
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import zmq

from server.engine.eu_channel import Publisher, open_joiner
from server.engine.eu_wire import Record, RequestRecords

INTRUDER_POSITION = 1_000_000  # where the intruder's records would be filed


async def _join(bind: str, n: int) -> dict:
    joiner = open_joiner(bind, None, {})
    try:
        joiner.register("r")
        print(json.dumps({"address": joiner.connect_address, "keys": joiner.publisher_keys()}), flush=True)
        delivered = 0
        for pos in range(n):
            delivered += await joiner.record("r", pos, timeout=30) is not None
        deadline = time.monotonic() + 30
        while joiner.rejected == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        intruder = await joiner.record("r", INTRUDER_POSITION, timeout=0.5)
        steps = joiner.stats("r")[0]
        return {
            "delivered": delivered,
            "steps": steps,
            "rejected": joiner.rejected,
            "dropped": joiner.dropped,
            "intruder_filed": intruder is not None,
        }
    finally:
        joiner.close()


def _publish(n: int, intruder: bool) -> None:
    first = json.loads(sys.stdin.readline())
    keys = first["keys"]
    if intruder:  # the server's public key is no secret; a client key of its own
        public, secret = zmq.curve_keypair()
        keys = {**keys, "client_public": public.decode(), "client_secret": secret.decode()}
    pub = Publisher(first["address"], keys)
    base = INTRUDER_POSITION if intruder else 0
    for i in range(n):  # queued until the handshake is done (n below the send high-water mark)
        pub.send(1, [RequestRecords("r-0000abcd", 1, 0, 0, 0.0, [Record.exact(base + i, 0.5, 0.25)])])
    print(json.dumps({"unsent": pub.unsent}), flush=True)
    sys.stdin.read()  # stay connected (LINGER 0 drops what is queued) until the test is done


def main(argv: list[str]) -> None:
    role = argv[0]
    if role == "joiner":
        print(json.dumps(asyncio.run(_join(argv[1], int(argv[2])))), flush=True)
    else:
        _publish(int(argv[1]), intruder=role == "intruder")


if __name__ == "__main__":
    main(sys.argv[1:])
