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
removed on close), so only the server's own user can connect to it. Across machines the
channel is tcp:// with CURVE (`eu_transport.py`, docs/reliability.md): a peer without the
proposer's key fails its handshake, so nothing it sends is read; each refused handshake is
counted (`Joiner.rejected`). `open_joiner` is the API side's one entry point.

The proposer never blocks on the channel: a message that cannot be queued (the joiner gone or
unreachable) is dropped and counted (`Publisher.unsent`), and its tokens' uncertainty is null.

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
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

from server.engine import eu_wire
from server.engine.eu_transport import (
    ChannelKeys,
    PrivateIpc,
    check_placement,
    curve_client,
    curve_server,
    parse_channel,
    private_address,
)
from server.engine.vllm_internals import external_id

log = logging.getLogger(__name__)

# refused handshakes: the peer's key is not the proposer's, it knows another server key, or it
# speaks no CURVE at all (ZMTP_MECHANISM_MISMATCH) — on a socket with CURVE, every failure is one
_REFUSED = (
    "EVENT_HANDSHAKE_FAILED_AUTH",
    "EVENT_HANDSHAKE_FAILED_PROTOCOL",
    "EVENT_HANDSHAKE_FAILED_NO_DETAIL",
)


def open_joiner(channel: str, vocab_size: int | None, vllm_args: Mapping) -> Joiner:
    """The API side of the channel for the operator's setting (`eu_transport.parse_channel`):
    a private ipc:// socket, or tcp:// with CURVE keys made now. Refuses, in one sentence, a
    placement the channel cannot reach (`check_placement`). `connect_address` and
    `publisher_keys()` are what the proposer needs."""
    where = parse_channel(channel)
    check_placement(where, vllm_args)
    if isinstance(where, PrivateIpc):
        return Joiner(vocab_size=vocab_size)
    joiner = Joiner(where.bind_address, vocab_size=vocab_size, keys=ChannelKeys.generate())
    port = int(joiner.address.rsplit(":", 1)[1])
    host_ip = None
    if where.wildcard:
        # where vLLM's own ranks reach this machine: VLLM_HOST_IP, else the default route's address
        from vllm.utils.network_utils import get_ip

        host_ip = get_ip()
    joiner.connect_address = where.connect_address(port, host_ip)
    log.info(
        "eu side channel: tcp with CURVE, bound to %s, proposer connects to %s",
        joiner.address,
        joiner.connect_address,
    )
    return joiner


class Publisher:
    """The proposer's end: connects lazily (the engine-core process is spawned after start-up),
    as the CURVE client `keys` describe (`ChannelKeys.publisher_keys`) where given. Every message
    carries `faults`, the proposer's failed steps so far."""

    def __init__(self, address: str, keys: Mapping[str, str] | None = None) -> None:
        self.address = address
        self._keys = dict(keys) if keys else None
        self._sock = None
        self.faults = 0
        self.unsent = 0  # messages dropped because the joiner could not take them

    def __repr__(self) -> str:
        return f"Publisher({self.address!r}, curve={self._keys is not None})"

    def send(
        self, live: int, reqs: list[eu_wire.RequestRecords], kv_bytes: int = 0, kv_tokens: int = 0
    ) -> None:
        import zmq

        if self._sock is None:
            sock = zmq.Context.instance().socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            if self._keys is not None:
                curve_client(sock, self._keys)
            sock.connect(self.address)
            self._sock = sock
        try:  # never block vLLM's step on the channel
            self._sock.send(eu_wire.encode(live, reqs, kv_bytes, kv_tokens, self.faults), zmq.NOBLOCK)
        except zmq.Again:
            self.unsent += 1
            if math.log10(self.unsent).is_integer():
                log.warning(
                    "eu side channel: %d message(s) not sent, the joiner is not taking them", self.unsent
                )


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
    removed by `close`. With `keys` it is a CURVE server admitting only the proposer's key
    (pyzmq's ZAP handler, on a context of its own) and counts refused handshakes (`rejected`).
    `vocab_size`, where known, bounds the token ids a record may hold. `connect_address` is
    where the proposer connects (`address`, unless `open_joiner` bound a wildcard)."""

    def __init__(
        self, address: str | None = None, *, vocab_size: int | None = None, keys: ChannelKeys | None = None
    ) -> None:
        import zmq

        self._folder = None
        if address is None:
            address, self._folder = private_address()
        if address.startswith("tcp://") and keys is None:
            raise ValueError("A tcp:// eu side channel needs CURVE keys (open_joiner makes them).")
        self.vocab_size = vocab_size
        self.keys = keys
        self.dropped = 0  # malformed messages received and dropped
        self.rejected = 0  # peers refused at the CURVE handshake: nothing of theirs was read
        self.proposer_faults = 0  # the proposer's failed steps, as of its last message
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, eu_wire.MAX_MESSAGE_BYTES)
        self._sock.ipv6 = address.startswith("tcp://[")
        self._auth = self._monitor = None
        if keys is not None:
            self._auth = curve_server(self._ctx, self._sock, keys)
            events = 0
            for name in _REFUSED:
                events |= getattr(zmq, name)
            self._monitor = self._sock.get_monitor_socket(events)
        try:
            self._sock.bind(address)
        except zmq.ZMQError as exc:
            self._close_sockets()
            raise ValueError(
                f"The eu side channel cannot bind {address}: {zmq.strerror(exc.errno)}."
            ) from None
        # the bound endpoint: a port of 0 (or *) resolved
        self.address = (
            self._sock.getsockopt_string(zmq.LAST_ENDPOINT) if address.startswith("tcp://") else address
        )
        self.connect_address = self.address
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

    def __repr__(self) -> str:
        return f"Joiner({self.address!r}, curve={self.keys is not None})"

    def publisher_keys(self) -> dict[str, str] | None:
        """The proposer's CURVE keys (`ProposerConfig.channel_keys`); None without CURVE."""
        return self.keys.publisher_keys() if self.keys is not None else None

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
        self._close_sockets()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def _close_sockets(self) -> None:
        if self._monitor is not None:
            self._sock.disable_monitor()
            self._monitor.close()
        if self._auth is not None:
            self._auth.stop()
        self._sock.close()
        self._ctx.term()

    def _run(self) -> None:
        import zmq

        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        if self._monitor is not None:
            poller.register(self._monitor, zmq.POLLIN)
        while not self._stop:
            ready = dict(poller.poll(100))
            if self._monitor is not None and self._monitor in ready:
                self._refused()
            if self._sock not in ready:
                continue
            try:
                self.receive(self._sock.recv(copy=True))
            except Exception:  # never let one message end the joiner
                log.exception("eu side channel: failed to file a message")

    def _refused(self) -> None:
        """Count a refused handshake (the monitor's only events)."""
        from zmq.utils.monitor import recv_monitor_message

        event = recv_monitor_message(self._monitor)
        self.rejected += 1
        if math.log10(self.rejected).is_integer():  # the 1st, 10th, 100th, ... peer refused
            log.warning(
                "eu side channel: refused a peer's handshake (%d so far; %s, %s)",
                self.rejected,
                event["event"].name,
                event["endpoint"].decode(errors="replace"),
            )

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
            self.proposer_faults = msg.faults
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
