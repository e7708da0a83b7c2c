"""The side channel's transports on loopback: tcp:// with CURVE delivers every record and
refuses (and counts) every peer without the proposer's key; the setting and the placement are
checked at start-up in one sentence; the keys' secrets never show in a repr or a log line;
stale ipc sockets of earlier versions are removed, live ones and others' left alone. Across
two network namespaces: test_eu_channel_netns.py."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import tempfile
import time

import pytest
import zmq

from server.engine.eu_channel import Joiner, Publisher, open_joiner
from server.engine.eu_transport import (
    ChannelKeys,
    PrivateIpc,
    Tcp,
    check_placement,
    parse_channel,
    remove_stale_sockets,
)
from server.engine.eu_wire import Record, RequestRecords
from server.engine.proposer_config import ProposerConfig


def _msg(position: int, req: str = "a-1234abcd") -> list[RequestRecords]:
    return [RequestRecords(req, 1, 0, 0, 0.0, [Record.exact(position, 0.5, 0.25)])]


async def _wait(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return predicate()


# --- tcp:// with CURVE on loopback


def test_every_record_crosses_tcp_with_curve():
    n = 300

    async def scenario():
        joiner = open_joiner("tcp://127.0.0.1:0", None, {})
        try:
            joiner.register("a")
            pub = Publisher(joiner.connect_address, joiner.publisher_keys())
            for pos in range(n):
                pub.send(1, _msg(pos))
            got = [await joiner.record("a", pos, timeout=10) for pos in range(n)]
            return got, joiner.stats("a")[0], joiner.rejected, pub.unsent
        finally:
            joiner.close()

    got, steps, rejected, unsent = asyncio.run(scenario())
    assert all(r is not None and (r.variance, r.bias) == (0.5, 0.25) for r in got)
    assert steps == n and rejected == 0 and unsent == 0


def test_peers_without_the_proposers_key_are_refused_and_counted():
    """Three kinds of intruder, each refused at the handshake and counted; none of their records
    is filed; the proposer's own records still arrive after them."""

    async def scenario():
        joiner = open_joiner("tcp://127.0.0.1:0", None, {})
        keys = joiner.publisher_keys()
        public, secret = zmq.curve_keypair()
        other_server, _ = zmq.curve_keypair()
        intruders = {
            "a client key of its own": {
                **keys,
                "client_public": public.decode(),
                "client_secret": secret.decode(),
            },
            "another server key": {**keys, "server_public": other_server.decode()},
            "no CURVE at all": None,
        }
        counts = {}
        try:
            joiner.register("a")
            for name, their_keys in intruders.items():
                before = joiner.rejected
                pub = Publisher(joiner.connect_address, their_keys)
                pub.send(1, _msg(666))
                counts[name] = await _wait(lambda before=before: joiner.rejected > before)
                pub._sock.close()
            filed = await joiner.record("a", 666, timeout=0.3)
            pub = Publisher(joiner.connect_address, keys)  # held: LINGER 0 drops what a closed one queued
            pub.send(1, _msg(7))
            own = await joiner.record("a", 7, timeout=10)
            return counts, filed, own, joiner.stats("a")[0]
        finally:
            joiner.close()

    counts, filed, own, steps = asyncio.run(scenario())
    assert counts == {name: True for name in counts}
    assert filed is None and own is not None and steps == 1


def test_a_wildcard_bind_tells_the_proposer_vllms_host_address(monkeypatch):
    pytest.importorskip("vllm")
    monkeypatch.setenv("VLLM_HOST_IP", "127.0.0.1")  # where vLLM's own ranks reach this machine

    async def scenario():
        joiner = open_joiner("tcp://0.0.0.0:0", None, {"distributed_executor_backend": "ray"})
        try:
            joiner.register("a")
            pub = Publisher(joiner.connect_address, joiner.publisher_keys())
            pub.send(1, _msg(3))
            return joiner.address, joiner.connect_address, await joiner.record("a", 3, timeout=10)
        finally:
            joiner.close()

    bound, connect, rec = asyncio.run(scenario())
    port = bound.rsplit(":", 1)[1]
    assert bound == f"tcp://0.0.0.0:{port}" and connect == f"tcp://127.0.0.1:{port}"
    assert rec is not None


def test_a_tcp_joiner_needs_keys_and_a_free_address():
    with pytest.raises(ValueError, match="needs CURVE keys"):
        Joiner("tcp://127.0.0.1:0")
    taken = open_joiner("tcp://127.0.0.1:0", None, {})
    try:
        with pytest.raises(ValueError, match=r"cannot bind tcp://127\.0\.0\.1:\d+: Address already in use\."):
            open_joiner(taken.address, None, {})
    finally:
        taken.close()


def test_the_publisher_never_blocks_when_nobody_takes_its_messages():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pub = Publisher(f"tcp://127.0.0.1:{port}", ChannelKeys.generate().publisher_keys())
    start = time.monotonic()
    for pos in range(1500):  # beyond the send high-water mark of 1000
        pub.send(1, _msg(pos))
    assert time.monotonic() - start < 5
    assert 400 <= pub.unsent <= 500
    pub._sock.close()


# --- the setting and the placement, refused at start-up


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("ipc", PrivateIpc()),
        ("tcp://0.0.0.0:5557", Tcp("0.0.0.0", 5557)),
        ("tcp://*:*", Tcp("*", 0)),
        ("tcp://10.0.0.1:0", Tcp("10.0.0.1", 0)),
        ("tcp://api-host.internal:5557", Tcp("api-host.internal", 5557)),
        ("tcp://[::]:5557", Tcp("::", 5557)),
    ],
)
def test_channel_settings_that_parse(text, parsed):
    assert parse_channel(text) == parsed


@pytest.mark.parametrize(
    "text", ["", "ipc:///tmp/x", "tcp://host", "tcp://:5557", "tcp://h:70000", "udp://h:1", "tcp://h:1/x"]
)
def test_channel_settings_that_do_not(text):
    with pytest.raises(ValueError, match=r"^eu_channel must be 'ipc' .* or tcp://HOST:PORT .*\.$"):
        parse_channel(text)


@pytest.mark.parametrize(
    ("channel", "args", "refused"),
    [
        ("ipc", {}, None),
        ("ipc", {"distributed_executor_backend": "mp", "tensor_parallel_size": 2}, None),
        ("ipc", {"distributed_executor_backend": "ray"}, "default ipc side channel cannot reach"),
        ("ipc", {"nnodes": 2}, "With nnodes 2 vLLM's workers may run on other machines"),
        ("tcp://127.0.0.1:5557", {"distributed_executor_backend": "ray"}, r"on loopback \(127\.0\.0\.1\)"),
        ("tcp://localhost:5557", {"nnodes": 2}, r"on loopback \(localhost\)"),
        ("tcp://0.0.0.0:5557", {"distributed_executor_backend": "ray"}, None),
        ("tcp://10.0.0.1:5557", {"nnodes": 2}, None),
    ],
)
def test_placements_the_channel_cannot_reach_are_refused(channel, args, refused):
    if refused is None:
        check_placement(parse_channel(channel), args)
    else:
        with pytest.raises(ValueError, match=refused) as err:
            check_placement(parse_channel(channel), args)
        assert str(err.value).count(". ") == 0 and str(err.value).endswith(".")  # one sentence


def test_open_joiner_refuses_before_binding():
    with pytest.raises(ValueError, match="default ipc side channel cannot reach"):
        open_joiner("ipc", None, {"distributed_executor_backend": "ray"})


# --- secrets


def test_the_secrets_show_in_no_repr_and_no_log_line(caplog):
    caplog.set_level(logging.DEBUG)

    async def scenario():
        joiner = open_joiner("tcp://127.0.0.1:0", None, {})
        try:
            joiner.register("a")
            keys = joiner.publisher_keys()
            pub = Publisher(joiner.connect_address, keys)
            pub.send(1, _msg(1))
            await joiner.record("a", 1, timeout=10)
            cfg = ProposerConfig(drafts=("d",), channel=joiner.connect_address, channel_keys=keys)
            return joiner.keys, [repr(joiner), repr(joiner.keys), repr(pub), repr(cfg), str(cfg)]
        finally:
            joiner.close()

    keys, reprs = asyncio.run(scenario())
    secrets = [keys.server_secret.decode(), keys.client_secret.decode()]
    shown = "\n".join([*reprs, caplog.text])
    assert "curve=True" in reprs[0] and "eu side channel: tcp with CURVE" in caplog.text
    assert not any(s in shown for s in secrets)
    assert "server_secret" not in str(keys.publisher_keys())  # the proposer never gets it


# --- ipc sockets of earlier versions


def _unix_socket(path: str, listening: bool) -> socket.socket | None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    if listening:
        s.listen()
        return s
    s.close()  # the file stays: a server that did not clean up
    return None


def test_stale_sockets_are_removed_and_live_or_foreign_ones_kept(tmp_path):
    old_stale, old_live = tmp_path / "epispec-eu-0123456789ab", tmp_path / "epispec-eu-ba9876543210"
    dir_stale, dir_live = tmp_path / "epispec-eu-stale123", tmp_path / "epispec-eu-live4567"
    dir_more, unrelated = tmp_path / "epispec-eu-more8901", tmp_path / "other.sock"
    for d in (dir_stale, dir_live, dir_more):
        d.mkdir(mode=0o700)
    _unix_socket(str(old_stale), listening=False)
    _unix_socket(str(dir_stale / "eu.sock"), listening=False)
    _unix_socket(str(dir_more / "eu.sock"), listening=False)
    (dir_more / "notes.txt").write_text("not ours to delete")
    _unix_socket(str(unrelated), listening=False)
    live = [_unix_socket(str(old_live), True), _unix_socket(str(dir_live / "eu.sock"), True)]
    foreign = None
    if os.geteuid() == 0:  # another user's stale socket
        foreign = tmp_path / "epispec-eu-f0f0f0f0f0f0"
        _unix_socket(str(foreign), listening=False)
        os.chown(foreign, 65534, 65534)
    try:
        removed = remove_stale_sockets(str(tmp_path))
    finally:
        for s in live:
            s.close()
    assert sorted(removed) == sorted([str(old_stale), str(dir_stale)])
    assert not old_stale.exists() and not dir_stale.exists()
    assert old_live.exists() and dir_live.exists() and dir_more.exists() and unrelated.exists()
    assert foreign is None or foreign.exists()


def test_a_new_joiner_removes_stale_sockets_and_never_uses_them(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    old = tmp_path / "epispec-eu-0123456789ab"
    _unix_socket(str(old), listening=False)
    joiner = Joiner()
    try:
        assert not old.exists()
        assert joiner.address.startswith(f"ipc://{tmp_path}/epispec-eu-")
        assert joiner.address.endswith("/eu.sock") and joiner.publisher_keys() is None
    finally:
        joiner.close()
