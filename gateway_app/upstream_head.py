"""The upstream's answer head, read strictly: what http.client reads line by line is checked
first, so that nothing HTTP does not allow reaches the client (see :class:`HeadReader`).

Part of the stock transport (:mod:`~gateway_app.transport`), on http.client's documented
hooks: ``HTTPConnection.response_class`` and ``HTTPResponse.begin``.
"""

from __future__ import annotations

import http.client
import re
from collections.abc import Callable
from typing import IO

#: http.client's bounds on a header block: bytes per line, and lines.
MAX_LINE = 65536
MAX_HEADERS = 100


class UpstreamProtocolError(http.client.HTTPException):
    """The upstream's answer breaks HTTP in a way the gateway does not pass on (a 502)."""


#: Interim (1xx) answers skipped before the final one; past this the upstream is refused.
MAX_INTERIM_ANSWERS = 16
#: A field line (RFC 9110 section 5): a token, a colon, a value of visible characters,
#: spaces and tabs (obs-text included), ended by CRLF or a bare LF (RFC 9112 section 2.2).
#: A CR anywhere else, a control character, a space in the name: refused.
_FIELD_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[ \t\x21-\x7e\x80-\xff]*\r?\n").fullmatch
#: An obsolete folded continuation line (RFC 9112 section 5.2); urllib3 unfolds it.
_FOLDED_LINE = re.compile(rb"[ \t]+[ \t\x21-\x7e\x80-\xff]*\r?\n").fullmatch
_FRAMING = (b"content-length", b"transfer-encoding")


def _status_code(line: bytes) -> int | None:
    """The status code of a status line, as http.client reads it; ``None`` for a line
    http.client refuses by itself."""
    parts = line.split(None, 2)
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and len(parts[1]) == 3 \
            and parts[1].isdigit():
        return int(parts[1])
    return None


def _refuse_line(line: bytes) -> UpstreamProtocolError:
    name, colon, value = line.rstrip(b"\r\n").partition(b":")
    if not colon:
        what = "a header line without a colon"
    elif not re.fullmatch(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", name):
        what = f"the header name {name[:64]!r}"
    elif b"\r" in value:
        what = f"a bare CR in the value of {name.decode('latin-1')}"
    else:
        what = f"a control character in the value of {name.decode('latin-1')}"
    return UpstreamProtocolError(f"the upstream's answer has {what}")


class HeadReader:
    """The answer's file, as http.client reads the head from it (line by line), checked.

    Skips interim answers (1xx but 101, which the gateway never asked for); refuses a status
    outside 100-599, a malformed field line, a head cut before its blank line, and framing the
    gateway cannot relay as it is: Content-Length not exactly one number, Transfer-Encoding
    other than ``chunked``, or both at once (RFC 9112 section 6.3: a smuggling attempt).
    """

    __slots__ = ("_fp", "readline", "_framing", "_last")

    def __init__(self, fp: IO[bytes]) -> None:
        self._fp = fp
        #: http.client reads the status line first, then the field lines, each by readline.
        self.readline: Callable[[int], bytes] = self._status_line
        #: Lower-cased name and value of each Content-Length and Transfer-Encoding line.
        self._framing: list[tuple[bytes, bytes]] = []
        #: The last field line, for a folded line that follows it.
        self._last = b""

    def close(self) -> None:
        self._fp.close()

    def _status_line(self, limit: int = -1) -> bytes:
        for _ in range(MAX_INTERIM_ANSWERS + 1):
            line = self._fp.readline(limit)
            code = _status_code(line)
            if code is None or code >= 200:  # a final answer (or one http.client refuses)
                if code is not None and code > 599:
                    raise UpstreamProtocolError(f"the upstream answered status {code}")
                self.readline = self._field_line
                return line
            if code == 101:
                raise UpstreamProtocolError("the upstream switched protocols unasked (101)")
            self._skip_interim(limit)
        raise UpstreamProtocolError(f"more than {MAX_INTERIM_ANSWERS} interim (1xx) answers")

    def _skip_interim(self, limit: int) -> None:
        for _ in range(MAX_HEADERS + 1):
            line = self._fp.readline(limit)
            if line in (b"\r\n", b"\n"):
                return
            if not line:
                raise UpstreamProtocolError("the upstream closed inside an interim answer")
            if len(line) > MAX_LINE:
                raise http.client.LineTooLong("header line")
            if not (_FIELD_LINE(line) or _FOLDED_LINE(line)):
                raise _refuse_line(line)
        raise http.client.HTTPException(f"got more than {MAX_HEADERS} headers")

    def _field_line(self, limit: int = -1) -> bytes:
        line = self._fp.readline(limit)
        if _FIELD_LINE(line):  # the usual line first
            self._last = line
            if line[0] in b"cCtT":
                name, _, value = line.partition(b":")
                name = name.lower()
                if name in _FRAMING:
                    self._framing.append((name, value.strip()))
        elif line in (b"\r\n", b"\n"):
            if self._framing:
                self._check_framing()
        elif not line:
            raise UpstreamProtocolError("the upstream closed inside its answer's head")
        elif len(line) > MAX_LINE:
            pass  # http.client refuses it (LineTooLong)
        elif not _FOLDED_LINE(line) or not self._last:
            raise _refuse_line(line)
        elif self._last.partition(b":")[0].lower() in _FRAMING:
            raise UpstreamProtocolError("a folded Content-Length or Transfer-Encoding line")
        return line

    def _check_framing(self) -> None:
        lengths = [value for name, value in self._framing if name == b"content-length"]
        codings = [value for name, value in self._framing if name == b"transfer-encoding"]
        if codings:
            if lengths:
                raise UpstreamProtocolError("the upstream sent both Content-Length and "
                                            "Transfer-Encoding")
            if len(codings) > 1 or codings[0].lower() != b"chunked":
                raise UpstreamProtocolError("the upstream's Transfer-Encoding is not chunked")
        elif len(lengths) > 1 or not lengths[0].isdigit():
            raise UpstreamProtocolError("the upstream's Content-Length is not one number")


class UpstreamHTTPResponse(http.client.HTTPResponse):
    """http.client's response, reading its head through a :class:`HeadReader`."""

    #: Reads the status line and the header block: http.client's own ``begin``
    #: (:mod:`~gateway_app.fastpaths` may give a transport a faster one).
    read_head = http.client.HTTPResponse.begin

    def begin(self) -> None:
        if self.headers is not None:
            return
        fp = self.fp
        reader = HeadReader(fp)  # type: ignore[arg-type]
        self.fp = reader  # type: ignore[assignment]
        try:
            self.read_head()
        finally:
            if self.fp is reader:  # (http.client drops its file when it refuses the status)
                self.fp = fp
