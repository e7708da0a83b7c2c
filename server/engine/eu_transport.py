"""Where the side channel (eu_channel.py) runs: a private `ipc://` socket on one machine (the
default), or `tcp://` across machines, authenticated with ZeroMQ's CURVE (docs/reliability.md).

- `parse_channel`: the operator's setting, "ipc" or tcp://HOST:PORT, as `PrivateIpc` or `Tcp`.
- `ChannelKeys`: CURVE keys made at start-up in the API process. The joiner is the CURVE server
  and admits one client key, the proposer's; the proposer gets its keys through the typed
  proposer config (`publisher_keys`), never on a command line or in a log line.
- `check_placement`: refuses, in one sentence, a placement whose proposer cannot reach the joiner.
- `remove_stale_sockets`: earlier versions bound `/tmp/epispec-eu-<hex>` sockets that any local
  user could connect to; leftovers of ours that nothing listens on are removed.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

SOCKET_PREFIX = "epispec-eu-"  # the private directories (and, before, the sockets) under /tmp
SOCKET_NAME = "eu.sock"
WILDCARD_HOSTS = ("*", "0.0.0.0", "::")
PUBLISHER_KEY_NAMES = ("server_public", "client_public", "client_secret")
_TCP = re.compile(r"tcp://(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.*-]+)):(?P<port>\d{1,5}|\*)")


# --- the setting


@dataclass(frozen=True)
class PrivateIpc:
    """An ipc:// socket in a fresh 0700 directory of the API process's machine."""


@dataclass(frozen=True)
class Tcp:
    """tcp://HOST:PORT, bound by the joiner; port 0 takes a free one, a wildcard host binds every
    interface (the proposer then connects to the address vLLM's own ranks use, `get_ip`)."""

    host: str
    port: int

    @property
    def bind_address(self) -> str:
        return f"tcp://{self._bracketed(self.host)}:{self.port or '*'}"

    @property
    def ipv6(self) -> bool:
        return ":" in self.host

    @property
    def wildcard(self) -> bool:
        return self.host in WILDCARD_HOSTS

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:  # a host name or the wildcard
            return False

    def connect_address(self, port: int, host_ip: str | None = None) -> str:
        """Where the proposer connects once the joiner has bound `port`; `host_ip` replaces a
        wildcard host."""
        host = host_ip if self.wildcard and host_ip else self.host
        return f"tcp://{self._bracketed(host)}:{port}"

    @staticmethod
    def _bracketed(host: str) -> str:
        return f"[{host}]" if ":" in host else host


Channel = PrivateIpc | Tcp


def parse_channel(text: str) -> Channel:
    """The side channel's setting: "ipc" (the default) or tcp://HOST:PORT. ValueError otherwise."""
    if text == "ipc":
        return PrivateIpc()
    m = _TCP.fullmatch(text)
    port = None if m is None else 0 if m["port"] == "*" else int(m["port"])
    if m is None or port > 65535:
        raise ValueError(
            f"eu_channel must be 'ipc' (a private socket on this machine, the default) or "
            f"tcp://HOST:PORT (e.g. tcp://0.0.0.0:5557), not '{text}'."
        )
    return Tcp(m["v6"] or m["host"], port)


def check_placement(channel: Channel, vllm_args: Mapping) -> None:
    """Raise ValueError, in one sentence, where vLLM may run the proposer on another machine than
    the joiner's and `channel` cannot reach it there: the ipc:// default, or tcp:// on loopback.
    Ray places workers where it likes, and `nnodes` > 1 spreads them by design."""
    backend = vllm_args.get("distributed_executor_backend")
    nnodes = int(vllm_args.get("nnodes") or 1)
    if backend != "ray" and nnodes <= 1:
        return
    placement = "distributed_executor_backend 'ray'" if backend == "ray" else f"nnodes {nnodes}"
    if isinstance(channel, PrivateIpc):
        raise ValueError(
            f"With {placement} vLLM's workers may run on other machines, which the default ipc "
            "side channel cannot reach: pass --eu-channel tcp://0.0.0.0:PORT (docs/reliability.md)."
        )
    if channel.loopback:
        raise ValueError(
            f"With {placement} vLLM's workers may run on other machines, which cannot reach the "
            f"side channel on loopback ({channel.host}): bind an address they can reach, such as "
            "--eu-channel tcp://0.0.0.0:PORT."
        )


# --- CURVE keys


@dataclass(frozen=True)
class ChannelKeys:
    """Z85-encoded CURVE key pairs: the joiner's (server) and the proposer's (client)."""

    server_public: bytes
    server_secret: bytes = field(repr=False)
    client_public: bytes
    client_secret: bytes = field(repr=False)

    @classmethod
    def generate(cls) -> ChannelKeys:
        import zmq

        server_public, server_secret = zmq.curve_keypair()
        client_public, client_secret = zmq.curve_keypair()
        return cls(server_public, server_secret, client_public, client_secret)

    def publisher_keys(self) -> dict[str, str]:
        """What the proposer needs (`ProposerConfig.channel_keys`); never the server's secret."""
        return {
            "server_public": self.server_public.decode(),
            "client_public": self.client_public.decode(),
            "client_secret": self.client_secret.decode(),
        }

    def admits(self, client_public: bytes) -> bool:
        """The ZAP decision: only the proposer's key (compared in constant time)."""
        return hmac.compare_digest(client_public, self.client_public)


def curve_server(ctx, sock, keys: ChannelKeys):
    """Make `sock` a CURVE server admitting only `keys`' client, through pyzmq's ZAP handler on
    `ctx` (one per context). Returns the started authenticator (stop it before closing)."""
    from zmq.auth.thread import ThreadAuthenticator

    class _Provider:
        def callback(self, domain: str, key: bytes) -> bool:
            return keys.admits(key)

    auth = ThreadAuthenticator(ctx, log=logging.getLogger("zmq.auth"))
    auth.start()
    auth.configure_curve_callback("*", credentials_provider=_Provider())
    sock.curve_secretkey = keys.server_secret
    sock.curve_publickey = keys.server_public
    sock.curve_server = True
    return auth


def curve_client(sock, keys: Mapping[str, str]) -> None:
    """Make `sock` the CURVE client that `publisher_keys` describes. ValueError names a bad key."""
    for name in PUBLISHER_KEY_NAMES:
        value = keys.get(name)
        if not isinstance(value, str) or len(value) != 40:
            raise ValueError(f"channel_keys.{name} must be a 40-character Z85 CURVE key.")
    sock.curve_serverkey = keys["server_public"].encode()
    sock.curve_publickey = keys["client_public"].encode()
    sock.curve_secretkey = keys["client_secret"].encode()


# --- ipc:// sockets of this machine


def private_address() -> tuple[str, str]:
    """(ipc address, its directory): a fresh directory of mode 0700 under the temp folder."""
    remove_stale_sockets()
    folder = tempfile.mkdtemp(prefix=SOCKET_PREFIX)  # mkdtemp creates it 0700, owned by us
    return f"ipc://{folder}/{SOCKET_NAME}", folder


def remove_stale_sockets(folder: str | None = None) -> list[str]:
    """Remove `SOCKET_PREFIX*` entries of ours under `folder` (default: the temp folder) that no
    process listens on: bare sockets of earlier versions (world-connectable) and the private
    directories of servers that did not close. Others' entries and live ones are left alone
    (an earlier server still running is not ours to cut off; we never use its socket).
    Returns what was removed."""
    root = Path(folder or tempfile.gettempdir())
    removed = []
    try:
        entries = [p for p in root.iterdir() if p.name.startswith(SOCKET_PREFIX)]
    except OSError:
        return removed
    for path in entries:
        try:
            st = path.lstat()
            if st.st_uid != os.getuid():
                continue
            if stat.S_ISSOCK(st.st_mode) and not _listening(path):
                path.unlink()
            elif (
                stat.S_ISDIR(st.st_mode)
                and (sock := path / SOCKET_NAME).is_socket()
                and not _listening(sock)
                and [p.name for p in path.iterdir()] == [SOCKET_NAME]
            ):
                shutil.rmtree(path)
            else:
                continue
        except OSError:  # gone meanwhile, or not ours to touch
            continue
        removed.append(str(path))
    if removed:
        log.info("removed %d stale side-channel socket(s) of earlier servers", len(removed))
    return removed


def _listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except ConnectionRefusedError:
            return False
        except OSError:  # anything else: leave it be
            return True
        return True
