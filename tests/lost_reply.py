"""A TCP relay in front of a redis-server that can lose one reply: the request goes
through and Redis runs it, then the client's connection is closed instead of passing the
replies on, as when a master dies between running a pipeline and answering it (its
replica had the writes) or a connection is cut. redis-py then sends the same commands
again on a new connection (its `Retry`, as after any ConnectionError): what a script does
when it runs twice with the same arguments is what the tests using this look at."""

from __future__ import annotations

import contextlib
import socket
import threading
from urllib.parse import urlsplit

from redis import Redis
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.retry import Retry


class ReplyLosingRelay:
    """Relays every connection to `redis_url`'s server. `lose_reply(marker, lines)`: the
    next request holding `marker` goes through; once Redis has sent `lines` lines of reply
    to it (an integer reply is one, an array of two strings five), the client's connection
    is closed and they are dropped. Once only."""

    def __init__(self, redis_url: str) -> None:
        parts = urlsplit(redis_url)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 6379)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self._lock = threading.Lock()
        self._marker: bytes | None = None
        self._lines = 0
        self.lost = threading.Event()  # set once a reply was dropped
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def retrying_client(self) -> Redis:
        """A plain client through the relay that sends a command (or a pipeline) again
        after a ConnectionError as redis-py's RedisCluster does by default (10 tries,
        waits from 10 ms doubling to 1 s; a plain client from a URL sends nothing again)."""
        return Redis.from_url(
            self.url, retry=Retry(ExponentialWithJitterBackoff(base=0.01, cap=1), 10)
        )

    def plain_client(self) -> Redis:
        """A plain client through the relay that sends nothing again itself (a redis://
        REDIS_URL's client: no `Retry`): what is sent again is the caller's doing."""
        return Redis.from_url(self.url, retry=Retry(NoBackoff(), 0))

    def lose_reply(self, marker: bytes, lines: int) -> None:
        with self._lock:
            self._marker, self._lines = marker, lines

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            armed = threading.Event()  # a request with the marker went through here
            threading.Thread(target=self._up, args=(client, server, armed), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, armed), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, armed: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                with self._lock:
                    if self._marker is not None and self._marker in data:
                        self._marker = None
                        armed.set()
                server.sendall(data)
        _close(client, server)

    def _down(self, server: socket.socket, client: socket.socket, armed: threading.Event) -> None:
        seen = 0
        with contextlib.suppress(OSError):
            while data := server.recv(65536):
                if not armed.is_set():
                    client.sendall(data)
                    continue
                seen += data.count(b"\r\n")
                if seen >= self._lines:  # Redis ran it all: its answer is lost
                    self.lost.set()
                    break
        _close(client, server)


def _close(*sockets: socket.socket) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            sock.close()
