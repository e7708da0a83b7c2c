"""The side channel across two network namespaces of the test's own making, joined by a veth
pair (10.231.0.1/30 and 10.231.0.2/30, addresses that exist only inside them): the joiner (the
API side) in one, the proposer's publisher in the other, as on two machines. Every record
arrives over tcp:// with CURVE; a peer with a key of its own is refused, counted, and nothing
it sends is filed. Needs root and `ip netns`; skipped, with the reason, where the sandbox
forbids them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
RECORDS = 500  # below the publisher's send high-water mark (1000): queued, never dropped
API_IP, WORKER_IP = "10.231.0.1", "10.231.0.2"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=20)


@pytest.fixture
def namespaces():
    """(api namespace, worker namespace), linked by a veth pair; removed afterwards."""
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2) here")
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    tag = f"{os.getpid() % 100000}"
    api, worker = f"epi-api-{tag}", f"epi-wrk-{tag}"
    made = []
    try:
        for ns in (api, worker):
            _ip("netns", "add", ns)
            made.append(ns)
        _ip("link", "add", f"epa{tag}", "type", "veth", "peer", "name", f"epw{tag}")
        for ns, dev, addr in ((api, f"epa{tag}", API_IP), (worker, f"epw{tag}", WORKER_IP)):
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as exc:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        pytest.skip(f"the sandbox does not allow network namespaces: {exc.stderr.strip()}")
    try:
        yield api, worker
    finally:
        for ns in made:  # deleting a namespace deletes its end of the veth pair, and so the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _peer(ns: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "tests.server.engine.eu_peer", *args]
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_records_cross_namespaces_and_a_wrong_key_is_refused(namespaces):
    api, worker = namespaces
    joiner = _peer(api, "joiner", f"tcp://{API_IP}:0", str(RECORDS))
    procs = [joiner]
    try:
        first = joiner.stdout.readline()
        assert first, joiner.stderr.read()
        assert json.loads(first)["address"].startswith(f"tcp://{API_IP}:")
        intruder = _peer(worker, "intruder", "20")
        publisher = _peer(worker, "publisher", str(RECORDS))
        procs += [intruder, publisher]
        for p in (intruder, publisher):
            p.stdin.write(first)
            p.stdin.flush()
        out, err = joiner.communicate(timeout=120)
        result = json.loads(out.strip().splitlines()[-1])
        sent = json.loads(publisher.stdout.readline())
    finally:
        for p in procs:
            if p.stdin and not p.stdin.closed:
                p.stdin.close()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
    assert sent == {"unsent": 0}
    assert result["delivered"] == RECORDS and result["steps"] == RECORDS  # 0 lost
    assert result["rejected"] >= 1  # the intruder's handshake, refused and counted
    assert not result["intruder_filed"] and result["dropped"] == 0
