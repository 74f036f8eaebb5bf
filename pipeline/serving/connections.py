"""The server's HTTP connections: uvicorn's httptools protocol, plus a deadline on each request's head and a
count of the open connections (how many requests the batcher can expect at most).

uvicorn times a connection out only while it is idle between requests (`timeout_keep_alive`): from a
request's first byte to its last header it waits as long as the client keeps the socket open, so a
client that trickles its headers (or opens a connection and sends nothing) would hold a socket and
a parser forever. Here the head must be whole within `head_timeout_s`: of the connection's opening
for its first request, of the request's first byte for the next ones; else 408 and the connection
is closed. The body has its own deadline (`Server.read`).

With several workers, a kept-alive connection stays with the worker that accepted it, and which one
accepts is a race: 8 clients were split 6 and 2 in one run, and the worker with 6 answered each of
its clients 4 times slower (docs/performance.md). With `requests_per_connection` set, a connection's
answer of that count says `connection: close`: the client reconnects, and the new connection goes
to the worker that accepts first, more often the one with less to do.
"""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

OPEN: set[asyncio.Protocol] = set()  # this worker's open connections (the batcher's `expected`)


def open_connections() -> int:
    """How many connections this worker has open: with HTTP/1.1, each has at most one request in flight."""
    return len(OPEN)


class TimedHeadProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol (httptools) with a deadline on the request head."""

    def __init__(self, *args, head_timeout_s: float, requests_per_connection: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.head_timeout_s = head_timeout_s
        self.head_deadline: asyncio.TimerHandle | None = None
        self.requests_per_connection = requests_per_connection  # 0: no limit
        self.requests = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        OPEN.add(self)
        self.arm()  # a connection that never sends a byte is cut too

    def on_message_begin(self) -> None:  # the parser saw the first byte of a request
        super().on_message_begin()
        self.arm()

    def on_headers_complete(self) -> None:
        self.disarm()
        super().on_headers_complete()
        self.requests += 1
        if self.requests_per_connection and self.requests >= self.requests_per_connection and self.cycle is not None:
            self.cycle.keep_alive = False  # uvicorn answers with `connection: close`, then closes the connection

    def connection_lost(self, exc: Exception | None) -> None:
        OPEN.discard(self)
        self.disarm()
        super().connection_lost(exc)

    def arm(self) -> None:
        if self.head_deadline is None:  # the first request's deadline runs from the connection's opening
            self.head_deadline = self.loop.call_later(self.head_timeout_s, self.head_timed_out)

    def disarm(self) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None

    def head_timed_out(self) -> None:
        self.head_deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:  # no answer being written: say why
            message = f"the request head did not arrive within {self.head_timeout_s:g} s"
            body = json.dumps({"error_code": "BAD_REQUEST", "message": message}).encode()
            head = (
                b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
            )
            self.transport.write(head + body)
        self.transport.close()
