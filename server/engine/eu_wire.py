"""The side channel's record and wire format: a schema'd MessagePack encoding (msgspec), never pickle.

`Record` is the one record of an emitted position's EU on its way from the proposer to the
token event: the proposer builds it (`Record.exact`, `Record.of_top_n`), the wire carries it,
the joiner files it and `VllmEngine` reads it. One message per engine step, from the proposer
(vLLM's engine-core process) to the API process's joiner (see eu_channel.py). On the wire it is
a MessagePack array

    [VERSION, live, [[req_id, passes, proposed, accepted, eu_seconds,
                      [[position, variance, bias, ids, probs], ...]], ...], kv_bytes, kv_tokens, faults]

with `bias` None when it could not be computed (or when the record carries q̄'s top-N in
`ids`/`probs`: little-endian int32 and float32 buffers of equal length), `variance` None when
it came out non-finite at the source. Decoding is typed (msgspec builds the structs below and
refuses anything else: wrong types, extension types, extra or missing fields) and then every
value is checked: counts and positions within bounds, floats finite, ids within the
vocabulary, probabilities within [0, 1], sizes bounded. Nothing in a message can run code.
A message that fails any check raises `WireError`; the joiner drops and counts it.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import msgspec
import numpy as np

VERSION = 1
MAX_MESSAGE_BYTES = 512 << 20  # the PULL socket refuses larger messages (full-vocabulary q̄ fits)
MAX_REQUESTS = 1 << 16  # rows of one engine step
MAX_RECORDS = 1024  # emitted positions of one request in one step (k + 1)
MAX_REQUEST_ID = 1024  # characters
MAX_COUNT = (1 << 31) - 1  # positions, passes, proposed, accepted, live slots
MAX_TOP_N = 1 << 24  # q̄ entries per record when the vocabulary size is not known
MAX_SECONDS = 1e6
PROB_SLACK = 1e-3  # float32 rounding above 1

_Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_COUNT)]


class WireError(ValueError):
    """A message that is not a valid side-channel message."""


class Record(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """One emitted position: its variance and either the exact bias or q̄'s top-N.

    `variance` and `bias` are None where they came out non-finite (or, for the bias, could not
    be computed); a record with `ids`/`probs` holds no bias (the API side computes it)."""

    position: _Count
    variance: float | None
    bias: float | None = None
    ids: bytearray | None = None  # int32 little-endian [N]
    probs: bytearray | None = None  # float32 little-endian [N]

    @classmethod
    def exact(cls, position: int, variance: float, bias: float | None) -> Record:
        """A record with the bias computed at the source (bias source "worker")."""
        return cls(int(position), _finite_or_none(variance), _finite_or_none(bias))

    @classmethod
    def of_top_n(cls, position: int, variance: float, ids, probs) -> Record:
        """A record with q̄'s top-N (ids [N], probs [N]; arrays or tensors on the host)."""
        ids = np.ascontiguousarray(ids, dtype="<i4")
        probs = np.ascontiguousarray(probs, dtype="<f4")
        return cls(
            int(position),
            _finite_or_none(variance),
            None,
            bytearray(ids.tobytes()),
            bytearray(probs.tobytes()),
        )

    def variance_or_nan(self) -> float:
        """The variance, NaN where it came out non-finite (null in the API's JSON)."""
        return math.nan if self.variance is None else self.variance

    def top_n(self) -> tuple[np.ndarray, np.ndarray] | None:
        """q̄'s top-N as (ids int32 [N], probs float32 [N]) arrays over the message's buffers."""
        if self.ids is None or self.probs is None:
            return None
        return np.frombuffer(self.ids, dtype="<i4"), np.frombuffer(self.probs, dtype="<f4")


class RequestRecords(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """One request's share of a step: its counters and the records of its emitted positions."""

    req_id: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_REQUEST_ID)]
    passes: _Count
    proposed: _Count
    accepted: _Count
    eu_seconds: Annotated[float, msgspec.Meta(ge=0, le=MAX_SECONDS)]
    records: Annotated[list[Record], msgspec.Meta(max_length=MAX_RECORDS)]


class Message(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """One engine step: the proposer's live slot count, every emitting request's records, the
    drafts' KV cache held after the step (bytes of blocks held, tokens whose keys stand), and
    the proposer's failed steps so far (each decoded on without proposals, null uncertainty)."""

    version: Literal[1]
    live: _Count
    reqs: Annotated[list[RequestRecords], msgspec.Meta(max_length=MAX_REQUESTS)]
    kv_bytes: Annotated[int, msgspec.Meta(ge=0)] = 0
    kv_tokens: Annotated[int, msgspec.Meta(ge=0)] = 0
    faults: _Count = 0


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def _finite_or_none(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def encode(
    live: int, reqs: list[RequestRecords], kv_bytes: int = 0, kv_tokens: int = 0, faults: int = 0
) -> bytes:
    """A step's message: the proposer's live slot count, each emitting request's records, the
    drafts' KV bytes and tokens held, and the proposer's failed steps so far."""
    return _encoder.encode(
        Message(VERSION, int(live), list(reqs), int(kv_bytes), int(kv_tokens), int(faults))
    )


def decode(data: bytes, vocab_size: int | None = None) -> Message:
    """The message in `data`, every field checked; `WireError` names the first problem."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise WireError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        msg = _decoder.decode(data)
    except msgspec.DecodeError as exc:  # ValidationError included
        raise WireError(str(exc)) from None
    for r in msg.reqs:
        if not math.isfinite(r.eu_seconds):
            raise WireError(f"request {r.req_id!r}: eu_seconds is not finite")
        for rec in r.records:
            _check_record(rec, vocab_size)
    return msg


def _check_record(rec: Record, vocab_size: int | None) -> None:
    for name in ("variance", "bias"):
        v = getattr(rec, name)
        if v is not None and not math.isfinite(v):
            raise WireError(f"position {rec.position}: {name} is not finite")
    if (rec.ids is None) != (rec.probs is None):
        raise WireError(f"position {rec.position}: ids and probs must come together")
    if rec.ids is None:
        return
    if rec.bias is not None:
        raise WireError(f"position {rec.position}: a record holds a bias or q̄'s top-N, not both")
    if len(rec.ids) % 4 or len(rec.ids) != len(rec.probs):
        raise WireError(
            f"position {rec.position}: ids ({len(rec.ids)} bytes) and probs "
            f"({len(rec.probs)} bytes) are not two int32/float32 arrays of one length"
        )
    ids, probs = rec.top_n()
    limit = vocab_size or MAX_TOP_N
    if len(ids) == 0 or len(ids) > limit:
        raise WireError(f"position {rec.position}: {len(ids)} q̄ entries (1 to {limit} allowed)")
    if ids.min() < 0 or ids.max() >= limit:
        raise WireError(f"position {rec.position}: token ids outside [0, {limit})")
    if not (np.isfinite(probs).all() and probs.min() >= 0 and probs.max() <= 1 + PROB_SLACK):
        raise WireError(f"position {rec.position}: probabilities outside [0, 1]")
