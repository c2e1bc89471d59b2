"""uvicorn's HTTP/1.1 connection (h11) with two limits it lacks: a deadline for a request's line and headers,
and `431` (OpenAI's error JSON) for headers beyond h11's limit.

Without the deadline a client that connects and sends nothing, or half a header, holds a connection (and a
file descriptor) forever: uvicorn times out only idle keep-alive connections. Without the 431, headers over
h11's 16 KiB limit get a plain-text 400 and a reset connection: uvicorn closes the socket with the rest of
the request unread, so the client, still sending, sees a reset rather than the answer. Here the rest is read
and dropped (for at most the deadline) before the connection closes.
"""

from __future__ import annotations

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_SECONDS = 10.0  # from connecting (or the end of the previous response) to a request's last header


class Connection(H11Protocol):
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._deadline = None
        self._error: h11.RemoteProtocolError | None = None
        self._discarding = False
        next_event = self.conn.next_event

        def remembering_next_event():  # uvicorn answers every protocol error with a 400; keep h11's status hint
            try:
                return next_event()
            except h11.RemoteProtocolError as e:
                self._error = e
                raise

        self.conn.next_event = remembering_next_event
        self._arm()

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(HEADER_TIMEOUT_SECONDS, self._timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _timed_out(self) -> None:
        self._deadline = None
        if self._discarding or self._between_requests():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        if self._between_requests():
            self._arm()
        super().data_received(data)
        if not self._between_requests():
            self._disarm()  # the headers are in: the request's own time is the app's business

    def eof_received(self):
        if self._discarding:
            self.transport.close()
        return super().eof_received()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request's headers get the same deadline

    def send_400_response(self, msg: str) -> None:
        status = getattr(self._error, "error_status_hint", 400) or 400
        message = ("the request's headers are too large (at most 16 KiB)" if status == 431
                   else f"not a valid HTTP request ({self._error or msg})")
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                     "code": None}}).encode()
        # h11 is in its error state: write the response bytes directly.
        reason = {400: b"Bad Request", 431: b"Request Header Fields Too Large"}.get(status, b"Bad Request")
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%s" % (status, reason, len(body), body))
        self._discarding = True  # read and drop the rest of the request, then close (at EOF or the deadline)
        self._disarm()
        self._arm()
