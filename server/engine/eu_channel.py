"""The side channel that carries the proposer's per-position records to the API process.

vLLM runs the proposer inside its engine-core (or worker) process; token outputs reach the
API process through vLLM's own output socket, which has no room for our numbers. So the
proposer PUSHes one message per engine step over a ZeroMQ IPC socket, and the API side's
`Joiner` PULLs them on a background thread and files each record under (request id,
token position). `VllmEngine` awaits the record of every token it emits (the proposer sends
it before the step's output leaves the engine core, but the two sockets are not ordered).

Memory stays bounded: a message carries records of emitted positions only (never rejected
drafts); the joiner keeps records only for requests registered as live and drops a request's
records when it finishes or is aborted, and drops records for requests it does not know.

Safety: messages are schema'd MessagePack (`eu_wire.py`), never pickle, and validated on
receipt; a malformed message is dropped and counted (`Joiner.dropped`), never fatal to the
joiner's thread. The IPC socket lives in a private directory (mode 0700, unique per joiner,
removed on close), so only the server's own user can connect to it.

A message (`Publisher.send(live, reqs)`, encoded by `eu_wire.encode`) holds the proposer's
live slot count and one `eu_wire.RequestRecords` per emitting request; the joiner files each
`eu_wire.Record` as it arrives, and `VllmEngine` reads it. vLLM appends "-<8 chars>" to the
caller's request id; `external_id` strips it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import shutil
import stat
import tempfile
import threading
from dataclasses import dataclass, field

from server.engine import eu_wire
from server.engine.vllm_internals import external_id

log = logging.getLogger(__name__)

SOCKET_NAME = "eu.sock"


def private_address() -> tuple[str, str]:
    """(ipc address, its directory): a fresh directory of mode 0700 under the temp folder."""
    folder = tempfile.mkdtemp(prefix="epispec-eu-")  # mkdtemp creates it 0700, owned by us
    return f"ipc://{folder}/{SOCKET_NAME}", folder


class Publisher:
    """The proposer's end: connects lazily (the engine-core process is spawned after start-up)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._sock = None

    def send(
        self, live: int, reqs: list[eu_wire.RequestRecords], kv_bytes: int = 0, kv_tokens: int = 0
    ) -> None:
        if self._sock is None:
            import zmq

            self._sock = zmq.Context.instance().socket(zmq.PUSH)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.connect(self.address)
        self._sock.send(eu_wire.encode(live, reqs, kv_bytes, kv_tokens))


@dataclass
class _Request:
    records: dict[int, eu_wire.Record] = field(default_factory=dict)  # position -> record
    passes: int = 0
    proposed: int = 0
    accepted: int = 0
    steps: int = 0  # engine steps that emitted tokens for this request
    eu_seconds: float = 0.0  # the proposer's time on this request's variance and q̄ summaries
    event: asyncio.Event = field(default_factory=asyncio.Event)


class Joiner:
    """The API side's end. `register` before submitting a request, `release` when it ends.

    Without an `address` it binds in a private directory of its own (`private_address`),
    removed by `close`. `vocab_size`, where known, bounds the token ids a record may hold."""

    def __init__(self, address: str | None = None, *, vocab_size: int | None = None) -> None:
        import zmq

        self._folder = None
        if address is None:
            address, self._folder = private_address()
        self.address = address
        self.vocab_size = vocab_size
        self.dropped = 0  # malformed messages received and dropped
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, eu_wire.MAX_MESSAGE_BYTES)
        self._sock.bind(address)
        if self._folder is not None:
            os.chmod(address.removeprefix("ipc://"), stat.S_IRUSR | stat.S_IWUSR)
        self._lock = threading.Lock()
        self._reqs: dict[str, _Request] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.proposer_states = 0  # the proposer's live slot count, as of its last message
        # the drafts' KV use at its largest since reset (bytes held, tokens held, live requests)
        self.kv_peak = (0, 0, 0)
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="epispec-joiner", daemon=True)
        self._thread.start()

    def register(self, req_id: str) -> None:
        self._loop = asyncio.get_running_loop()
        with self._lock:
            self._reqs[req_id] = _Request()

    def release(self, req_id: str) -> None:
        with self._lock:
            self._reqs.pop(req_id, None)

    def num_requests(self) -> int:
        """Requests holding joiner state (0 when idle)."""
        with self._lock:
            return len(self._reqs)

    def stats(self, req_id: str) -> tuple[int, int, int, int, float]:
        """(engine steps, draft passes, proposed, accepted, proposer EU seconds) so far."""
        r = self._reqs[req_id]
        return r.steps, r.passes, r.proposed, r.accepted, r.eu_seconds

    async def record(self, req_id: str, position: int, timeout: float) -> eu_wire.Record | None:
        """The record of the token at `position`; None if it does not come within `timeout`."""
        r = self._reqs[req_id]
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            with self._lock:
                rec = r.records.pop(position, None)
                if rec is None:
                    r.event.clear()
            if rec is not None:
                return rec
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return None
            try:
                await asyncio.wait_for(r.event.wait(), left)
            except TimeoutError:
                pass

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=2)
        self._sock.close()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def _run(self) -> None:
        import zmq

        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop:
            if not poller.poll(100):
                continue
            try:
                self.receive(self._sock.recv(copy=True))
            except Exception:  # never let one message end the joiner
                log.exception("eu side channel: failed to file a message")

    def receive(self, data: bytes) -> bool:
        """Decode, check and file one message; a malformed one is dropped and counted (False)."""
        try:
            msg = eu_wire.decode(data, self.vocab_size)
        except eu_wire.WireError as exc:
            self._drop(exc)
            return False
        self._file(msg)
        return True

    def _drop(self, exc: Exception) -> None:
        self.dropped += 1
        if math.log10(self.dropped).is_integer():  # the 1st, 10th, 100th, ... drop
            log.warning("eu side channel: dropped a malformed message (%d so far): %s", self.dropped, exc)

    def _file(self, msg: eu_wire.Message) -> None:
        woken = []
        with self._lock:
            self.proposer_states = msg.live
            if msg.kv_bytes > self.kv_peak[0]:
                self.kv_peak = (msg.kv_bytes, msg.kv_tokens, msg.live)
            for req in msg.reqs:
                r = self._reqs.get(external_id(req.req_id))
                if r is None:
                    continue  # finished or aborted: drop
                r.passes += req.passes
                r.proposed += req.proposed
                r.accepted += req.accepted
                r.eu_seconds += req.eu_seconds
                r.steps += 1
                for rec in req.records:
                    r.records[rec.position] = rec
                woken.append(r.event)
        if woken and self._loop is not None:
            for ev in woken:
                self._loop.call_soon_threadsafe(ev.set)
