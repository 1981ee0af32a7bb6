"""Sans-IO codec (h11 style) for the server side of NBD: fixed newstyle handshake and transmission.

The caller feeds received bytes to a parser, pulls events, and writes the bytes the builders return; with
no I/O here every framing rule is testable byte by byte.  Values follow NetworkBlockDevice/nbd doc/proto.md.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from itertools import chain
from typing import Final, Literal

# --- Magic numbers -----------------------------------------------------------------------------------
NBD_MAGIC: Final = 0x4E42444D41474943  # "NBDMAGIC" (INIT_PASSWD)
NBD_IHAVEOPT: Final = 0x49484156454F5054  # "IHAVEOPT"
NBD_OPTION_REPLY_MAGIC: Final = 0x3E889045565A9
NBD_REQUEST_MAGIC: Final = 0x25609513
NBD_SIMPLE_REPLY_MAGIC: Final = 0x67446698
NBD_STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF
# --- Handshake flags (server, 16 bits) and client flags (32 bits) ------------------------------------
NBD_FLAG_FIXED_NEWSTYLE: Final = 1 << 0
NBD_FLAG_NO_ZEROES: Final = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE: Final = 1 << 0
NBD_FLAG_C_NO_ZEROES: Final = 1 << 1
SERVER_HANDSHAKE_FLAGS: Final = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES
KNOWN_CLIENT_FLAGS: Final = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES
# --- Transmission flags (16 bits) --------------------------------------------------------------------
NBD_FLAG_HAS_FLAGS: Final = 1 << 0
NBD_FLAG_READ_ONLY: Final = 1 << 1
NBD_FLAG_SEND_FLUSH: Final = 1 << 2
NBD_FLAG_SEND_FUA: Final = 1 << 3
NBD_FLAG_ROTATIONAL: Final = 1 << 4
NBD_FLAG_SEND_TRIM: Final = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES: Final = 1 << 6
NBD_FLAG_SEND_DF: Final = 1 << 7
NBD_FLAG_CAN_MULTI_CONN: Final = 1 << 8
NBD_FLAG_SEND_CACHE: Final = 1 << 10
NBD_FLAG_SEND_FAST_ZERO: Final = 1 << 11
# --- Options -----------------------------------------------------------------------------------------
NBD_OPT_EXPORT_NAME: Final = 1
NBD_OPT_ABORT: Final = 2
NBD_OPT_LIST: Final = 3
NBD_OPT_STARTTLS: Final = 5
NBD_OPT_INFO: Final = 6
NBD_OPT_GO: Final = 7
NBD_OPT_STRUCTURED_REPLY: Final = 8
NBD_OPT_LIST_META_CONTEXT: Final = 9
NBD_OPT_SET_META_CONTEXT: Final = 10
NBD_OPT_EXTENDED_HEADERS: Final = 11  # experimental; we answer NBD_REP_ERR_UNSUP
# --- Option reply types (errors have bit 31 set) -----------------------------------------------------
NBD_REP_ACK: Final = 1
NBD_REP_SERVER: Final = 2
NBD_REP_INFO: Final = 3
NBD_REP_META_CONTEXT: Final = 4
NBD_REP_FLAG_ERROR: Final = 1 << 31
NBD_REP_ERR_UNSUP: Final = NBD_REP_FLAG_ERROR | 1
NBD_REP_ERR_POLICY: Final = NBD_REP_FLAG_ERROR | 2
NBD_REP_ERR_INVALID: Final = NBD_REP_FLAG_ERROR | 3
NBD_REP_ERR_PLATFORM: Final = NBD_REP_FLAG_ERROR | 4
NBD_REP_ERR_TLS_REQD: Final = NBD_REP_FLAG_ERROR | 5
NBD_REP_ERR_UNKNOWN: Final = NBD_REP_FLAG_ERROR | 6
NBD_REP_ERR_SHUTDOWN: Final = NBD_REP_FLAG_ERROR | 7
NBD_REP_ERR_BLOCK_SIZE_REQD: Final = NBD_REP_FLAG_ERROR | 8
NBD_REP_ERR_TOO_BIG: Final = NBD_REP_FLAG_ERROR | 9
# --- NBD_REP_INFO information types ------------------------------------------------------------------
NBD_INFO_EXPORT: Final = 0
NBD_INFO_NAME: Final = 1
NBD_INFO_DESCRIPTION: Final = 2
NBD_INFO_BLOCK_SIZE: Final = 3
# --- Commands and command flags ----------------------------------------------------------------------
NBD_CMD_READ: Final = 0
NBD_CMD_WRITE: Final = 1
NBD_CMD_DISC: Final = 2
NBD_CMD_FLUSH: Final = 3
NBD_CMD_TRIM: Final = 4
NBD_CMD_CACHE: Final = 5
NBD_CMD_WRITE_ZEROES: Final = 6
NBD_CMD_BLOCK_STATUS: Final = 7
NBD_CMD_FLAG_FUA: Final = 1 << 0
NBD_CMD_FLAG_NO_HOLE: Final = 1 << 1
NBD_CMD_FLAG_DF: Final = 1 << 2
NBD_CMD_FLAG_REQ_ONE: Final = 1 << 3
NBD_CMD_FLAG_FAST_ZERO: Final = 1 << 4
# --- Structured replies ------------------------------------------------------------------------------
NBD_REPLY_FLAG_DONE: Final = 1 << 0
NBD_REPLY_TYPE_NONE: Final = 0
NBD_REPLY_TYPE_OFFSET_DATA: Final = 1
NBD_REPLY_TYPE_OFFSET_HOLE: Final = 2
NBD_REPLY_TYPE_BLOCK_STATUS: Final = 5
NBD_REPLY_TYPE_ERROR: Final = (1 << 15) + 1
NBD_REPLY_TYPE_ERROR_OFFSET: Final = (1 << 15) + 2
# --- base:allocation metadata context ----------------------------------------------------------------
BASE_ALLOCATION: Final = "base:allocation"
NBD_STATE_HOLE: Final = 1 << 0
NBD_STATE_ZERO: Final = 1 << 1
# --- Error values (wire values, not the host's errno) ------------------------------------------------
NBD_EPERM: Final = 1
NBD_EIO: Final = 5
NBD_ENOMEM: Final = 12
NBD_EINVAL: Final = 22
NBD_ENOSPC: Final = 28
NBD_EOVERFLOW: Final = 75
NBD_ENOTSUP: Final = 95
NBD_ESHUTDOWN: Final = 108
# --- Limits ------------------------------------------------------------------------------------------
# The payload cap required of us; matches the spec's default maximum payload size of 2^25 = 32 MiB,
# which the spec also says SHOULD NOT be treated as a denial of service.
MAX_PAYLOAD: Final = 32 * 1024 * 1024
# Sane cap on one option's payload.  Strings (export names, queries) are at most 4096 bytes per the
# spec, so 64 KiB fits any legitimate option; anything bigger is treated as abuse (hard disconnect).
MAX_OPTION_LENGTH: Final = 64 * 1024
MAX_STRING_LENGTH: Final = 4096  # spec: strings MUST be no longer than 4096 bytes
MAX_META_QUERIES: Final = 128  # more -> NBD_REP_ERR_TOO_BIG, which the spec allows for list/set
# An oversized NBD_CMD_WRITE carries a payload, for which the spec says EOVERFLOW SHOULD NOT be used
# (EOVERFLOW is reserved for DF reads and payload-less commands); EINVAL is the fitting error.
OVERSIZED_WRITE_ERROR: Final = NBD_EINVAL

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_OPTION_HDR = struct.Struct(">QII")  # IHAVEOPT, option, length
_OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
_REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
_SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
_CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
_CHUNK_OFFSET = struct.Struct(">IHHQIQ")  # chunk header + 64-bit offset
_CHUNK_HOLE = struct.Struct(">IHHQIQI")  # chunk header + offset + hole size
_ERROR_HEAD = struct.Struct(">IHHQIIH")  # chunk header + error + message length
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")
_EXPORT_NAME_REPLY = struct.Struct(">QH")

_REQUEST_SIZE: Final = _REQUEST.size  # 28
_COMPACT_AT: Final = 256 * 1024  # drop consumed buffer prefix once it is this large


class ProtocolError(Exception):
    """The peer broke the protocol; the only safe reaction is to close the connection."""


class OptionPayloadError(ValueError):
    """An option payload is malformed; reply with `reply_type` and keep the connection."""

    reply_type: int = NBD_REP_ERR_INVALID


class OptionTooBigError(OptionPayloadError):
    """An option asks for more than we are willing to process (e.g. too many meta-context queries)."""

    reply_type = NBD_REP_ERR_TOO_BIG


class _Sentinel(enum.Enum):
    NEED_DATA = "NeedData"

    def __repr__(self) -> str:
        return self.value


NeedData: Final = _Sentinel.NEED_DATA
"""Returned by HandshakeParser.next_event() when more bytes must be fed first."""


@dataclass(frozen=True, slots=True)
class ClientFlags:
    flags: int

    @property
    def no_zeroes(self) -> bool:
        """Whether the 124 zero bytes after an NBD_OPT_EXPORT_NAME reply must be omitted."""
        return bool(self.flags & NBD_FLAG_C_NO_ZEROES)


@dataclass(frozen=True, slots=True)
class OptionRequest:
    option: int
    data: bytes


@dataclass(frozen=True, slots=True)
class InfoRequest:
    name: str
    info_types: list[int]


@dataclass(frozen=True, slots=True)
class MetaContextRequest:
    export_name: str
    queries: list[str]


HandshakeEvent = Literal[_Sentinel.NEED_DATA] | ClientFlags | OptionRequest


class HandshakeParser:
    """Parses what the client sends during the fixed-newstyle handshake (after server_greeting()).

    The first event is ClientFlags, then one OptionRequest per option.  When an option ends the
    handshake (EXPORT_NAME, or GO answered with ACK), call leftover() and hand the bytes to a
    RequestParser, since a client may pipeline its first requests.
    """

    __slots__ = ("_broken", "_buf", "_got_flags")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._got_flags = False
        self._broken: ProtocolError | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    def leftover(self) -> bytes:
        """Return and forget buffered bytes not yet consumed (the start of the transmission phase)."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest

    def next_event(self) -> HandshakeEvent:
        if self._broken is not None:
            raise self._broken
        try:
            return self._next()
        except ProtocolError as exc:
            self._broken = exc  # h11-style: once broken, stay broken
            raise

    def _next(self) -> HandshakeEvent:
        buf = self._buf
        if not self._got_flags:
            if len(buf) < 4:
                return NeedData
            (flags,) = _U32.unpack_from(buf)
            # Spec: the server MUST drop the connection on unknown client flags.  Servers MAY honour
            # clients lacking C_FIXED_NEWSTYLE; we do not (only fixed newstyle is implemented).
            if flags & ~KNOWN_CLIENT_FLAGS:
                raise ProtocolError(f"unknown client flags 0x{flags:08x}")
            if not flags & NBD_FLAG_C_FIXED_NEWSTYLE:
                raise ProtocolError("client did not set NBD_FLAG_C_FIXED_NEWSTYLE")
            del buf[:4]
            self._got_flags = True
            return ClientFlags(flags)
        if len(buf) < _OPTION_HDR.size:
            return NeedData
        magic, option, length = _OPTION_HDR.unpack_from(buf)
        if magic != NBD_IHAVEOPT:
            raise ProtocolError(f"bad option magic 0x{magic:016x}")
        if length > MAX_OPTION_LENGTH:
            raise ProtocolError(f"option {option} payload of {length} bytes exceeds {MAX_OPTION_LENGTH}")
        end = _OPTION_HDR.size + length
        if len(buf) < end:
            return NeedData
        data = bytes(buf[_OPTION_HDR.size : end])
        del buf[:end]
        return OptionRequest(option, data)


# --- Option payload parsers --------------------------------------------------------------------------


def decode_string(raw: bytes | memoryview, what: str = "string") -> str:
    """Decode a protocol string: UTF-8, no NUL, at most 4096 bytes (spec "Conventions")."""
    if len(raw) > MAX_STRING_LENGTH:
        raise OptionPayloadError(f"{what} longer than {MAX_STRING_LENGTH} bytes")
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OptionPayloadError(f"{what} is not valid UTF-8") from exc
    if "\0" in text:
        raise OptionPayloadError(f"{what} contains NUL")
    return text


def _take_string(data: bytes, pos: int, what: str) -> tuple[str, int]:
    if pos + 4 > len(data):
        raise OptionPayloadError(f"truncated {what} length")
    (n,) = _U32.unpack_from(data, pos)
    pos += 4
    if n > len(data) - pos:
        raise OptionPayloadError(f"{what} length {n} runs past the option payload")
    return decode_string(data[pos : pos + n], what), pos + n


def parse_export_name(data: bytes) -> str:
    """NBD_OPT_EXPORT_NAME payload: the whole payload is the name.  On error the server must hang up."""
    return decode_string(data, "export name")


def parse_info_request(data: bytes) -> InfoRequest:
    """NBD_OPT_INFO / NBD_OPT_GO payload: u32 name length, name, u16 count, count x u16 info types."""
    name, pos = _take_string(data, 0, "export name")
    if pos + 2 > len(data):
        raise OptionPayloadError("truncated information request count")
    (count,) = _U16.unpack_from(data, pos)
    pos += 2
    if len(data) - pos != 2 * count:
        raise OptionPayloadError(f"{count} information requests do not match {len(data) - pos} trailing bytes")
    return InfoRequest(name, list(struct.unpack_from(f">{count}H", data, pos)))


def parse_meta_context_request(data: bytes) -> MetaContextRequest:
    """NBD_OPT_{LIST,SET}_META_CONTEXT payload: u32+export name, u32 count, count x (u32+query)."""
    name, pos = _take_string(data, 0, "export name")
    if pos + 4 > len(data):
        raise OptionPayloadError("truncated query count")
    (count,) = _U32.unpack_from(data, pos)
    pos += 4
    if count > MAX_META_QUERIES:
        raise OptionTooBigError(f"{count} meta-context queries (max {MAX_META_QUERIES})")
    queries = []
    for _ in range(count):
        query, pos = _take_string(data, pos, "query")
        queries.append(query)
    if pos != len(data):
        raise OptionPayloadError("trailing bytes after meta-context queries")
    return MetaContextRequest(name, queries)


# --- Handshake reply builders ------------------------------------------------------------------------

_GREETING: Final = struct.pack(">QQH", NBD_MAGIC, NBD_IHAVEOPT, SERVER_HANDSHAKE_FLAGS)


def server_greeting() -> bytes:
    """First bytes the server sends: NBDMAGIC, IHAVEOPT, handshake flags FIXED_NEWSTYLE|NO_ZEROES."""
    return _GREETING


def option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    return _OPTION_REPLY.pack(NBD_OPTION_REPLY_MAGIC, option, reply_type, len(data)) + data


def option_error(option: int, err_type: int, message: str = "") -> bytes:
    """Error reply to an option; the optional message is shown to the user by the client."""
    if not err_type & NBD_REP_FLAG_ERROR:
        raise ValueError(f"reply type 0x{err_type:x} is not an error")
    return option_reply(option, err_type, _encode(message))


def info_export(option: int, size: int, transmission_flags: int) -> bytes:
    """NBD_REP_INFO / NBD_INFO_EXPORT, mandatory before ACKing INFO or GO."""
    return option_reply(option, NBD_REP_INFO, _INFO_EXPORT.pack(NBD_INFO_EXPORT, size, transmission_flags))


def info_block_size(option: int, minimum: int, preferred: int, maximum: int) -> bytes:
    return option_reply(option, NBD_REP_INFO, _INFO_BLOCK_SIZE.pack(NBD_INFO_BLOCK_SIZE, minimum, preferred, maximum))


def info_name(option: int, name: str) -> bytes:
    return option_reply(option, NBD_REP_INFO, _U16.pack(NBD_INFO_NAME) + _encode(name))


def rep_server(option: int, name: str, description: str = "") -> bytes:
    """One NBD_REP_SERVER entry of an NBD_OPT_LIST answer (name, then optional human-readable details)."""
    raw = _encode(name)
    return option_reply(option, NBD_REP_SERVER, _U32.pack(len(raw)) + raw + _encode(description))


def rep_meta_context(option: int, context_id: int, name: str) -> bytes:
    return option_reply(option, NBD_REP_META_CONTEXT, _U32.pack(context_id) + _encode(name))


def export_name_reply(size: int, transmission_flags: int, no_zeroes: bool) -> bytes:
    """Reply to NBD_OPT_EXPORT_NAME (no option-reply header; 124 zeroes unless C_NO_ZEROES)."""
    head = _EXPORT_NAME_REPLY.pack(size, transmission_flags)
    return head if no_zeroes else head + bytes(124)


def _encode(text: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > MAX_STRING_LENGTH:
        raise ValueError(f"string longer than {MAX_STRING_LENGTH} bytes")
    return raw


# --- TLS (proto.md, "TLS support") --------------------------------------------------------------------


class TlsStep(enum.Enum):
    """What the server does with an option, given its TLS mode, before any other handling."""

    SERVE = "serve"  # handle the option as usual
    REPLY = "reply"  # send the reply given and keep haggling
    START = "start"  # send the reply given (an ACK), then run the TLS handshake on the same connection
    HANG_UP = "hang_up"  # end the session at once (an option that cannot be answered with an error)


def tls_step(option: int, data: bytes, *, forced: bool, active: bool) -> tuple[TlsStep, bytes]:
    """The TLS rules of option haggling, for a server in FORCEDTLS mode (``forced``) or in NOTLS mode.

    NOTLS answers STARTTLS with NBD_REP_ERR_POLICY: TLS exists, just not on this listener. FORCEDTLS ACKs STARTTLS
    (NBD_REP_ERR_INVALID with data, or once TLS runs), lets ABORT through, hangs up on EXPORT_NAME (it cannot be
    refused) and answers every other option NBD_REP_ERR_TLS_REQD until TLS runs.
    """
    if option == NBD_OPT_STARTTLS:
        if not forced:
            return TlsStep.REPLY, option_error(option, NBD_REP_ERR_POLICY,
                                               "TLS is served on the TCP listener only")
        if active:
            return TlsStep.REPLY, option_error(option, NBD_REP_ERR_INVALID, "TLS is already running")
        if data:
            return TlsStep.REPLY, option_error(option, NBD_REP_ERR_INVALID, "STARTTLS takes no data")
        return TlsStep.START, option_reply(option, NBD_REP_ACK)
    if not forced or active or option == NBD_OPT_ABORT:
        return TlsStep.SERVE, b""
    if option == NBD_OPT_EXPORT_NAME:
        return TlsStep.HANG_UP, b""
    return TlsStep.REPLY, option_error(option, NBD_REP_ERR_TLS_REQD,
                                       "this server requires TLS with a client certificate (nbds://)")


# --- Transmission: requests --------------------------------------------------------------------------


@dataclass(slots=True)
class Request:
    flags: int
    type: int
    cookie: int
    offset: int
    length: int
    data: bytes | None = None  # WRITE payload; None for other commands and for an oversized WRITE
    oversized: bool = False  # length > MAX_PAYLOAD; for a WRITE the payload was discarded


class RequestParser:
    """Incremental parser of transmission-phase requests.

    Call next_request() until it returns None after every feed().  When the buffer is drained (the usual
    case) a fed `bytes` chunk becomes the buffer itself, so a burst of pipelined requests costs one unpack
    each and no copy of the chunk; allocating and freeing a >128 KiB bytearray per feed costs far more
    than the parsing.  Only a partial request carried over to the next feed goes into a bytearray (with a
    read offset, compacted occasionally).  A WRITE payload still in flight bypasses the buffer: chunks are
    kept and joined once; an oversized payload is only counted down, never stored.
    """

    __slots__ = ("_buf", "_parts", "_pending", "_pos", "_remaining")

    def __init__(self, initial: bytes = b"") -> None:
        self._buf: bytes | bytearray = bytes(initial)
        self._pos = 0
        self._pending: Request | None = None  # WRITE whose payload is incomplete
        self._remaining = 0  # payload bytes still to come for _pending
        self._parts: list[bytes | memoryview] = []  # memoryviews only ever wrap immutable bytes

    @property
    def buffered(self) -> int:
        """Bytes held by the parser (unparsed + partial WRITE payload), for tests and back-pressure."""
        return len(self._buf) - self._pos + sum(map(len, self._parts))

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        buf = self._buf
        pos = self._pos
        if pos == len(buf):  # drained: adopt the chunk instead of copying it
            self._buf = b""
            self._pos = 0
            req = self._pending
            if req is not None and self._remaining:  # mid-payload: route straight to the payload
                n = min(self._remaining, len(data))
                self._remaining -= n
                if not req.oversized:
                    whole = n == len(data) and type(data) is bytes
                    self._parts.append(data if whole else bytes(memoryview(data)[:n]))  # type: ignore[arg-type]
                if n == len(data):
                    return
                data = memoryview(data)[n:]
            self._buf = data if type(data) is bytes else bytes(data)
        elif isinstance(buf, bytearray):
            if pos >= _COMPACT_AT:
                del buf[:pos]
                self._pos = 0
            buf += data
        else:  # carry the unparsed tail of an adopted chunk (normally < one header) into a bytearray
            carry = bytearray(memoryview(buf)[pos:])
            carry += data
            self._buf = carry
            self._pos = 0

    def next_request(self) -> Request | None:
        """Return the next complete request, or None if more data is needed."""
        if self._pending is not None:
            return self._finish_payload()
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < _REQUEST_SIZE:
            return None
        magic, flags, typ, cookie, offset, length = _REQUEST.unpack_from(buf, pos)
        if magic != NBD_REQUEST_MAGIC:
            raise ProtocolError(f"bad request magic 0x{magic:08x}")
        pos += _REQUEST_SIZE
        if typ != NBD_CMD_WRITE:
            self._pos = pos
            return Request(flags, typ, cookie, offset, length, None, length > MAX_PAYLOAD)
        end = pos + length
        if end <= len(buf) and length <= MAX_PAYLOAD:  # fast path: whole payload already buffered
            self._pos = end
            return Request(flags, typ, cookie, offset, length, _copy(buf, pos, end))
        self._pos = pos
        self._pending = Request(flags, typ, cookie, offset, length, None, length > MAX_PAYLOAD)
        self._remaining = length
        return self._finish_payload()

    def _finish_payload(self) -> Request | None:
        req = self._pending
        assert req is not None
        buf = self._buf
        pos = self._pos
        if self._remaining:
            n = min(self._remaining, len(buf) - pos)
            if n:
                if not req.oversized:  # a view of immutable bytes is safe to keep; a bytearray is not
                    keep = memoryview(buf)[pos : pos + n] if type(buf) is bytes else _copy(buf, pos, pos + n)
                    self._parts.append(keep)
                self._pos = pos + n
                self._remaining -= n
            if self._remaining:
                return None
        if not req.oversized:
            parts = self._parts
            req.data = parts[0] if len(parts) == 1 and type(parts[0]) is bytes else b"".join(parts)
            self._parts = []
        self._pending = None
        return req


def _copy(buf: bytes | bytearray, start: int, end: int) -> bytes:
    if type(buf) is bytes:
        return buf[start:end]
    with memoryview(buf) as view:  # one copy, and the export is released before buf is resized
        return view[start:end].tobytes()


# --- Transmission: reply builders --------------------------------------------------------------------


def simple_reply(cookie: int, error: int = 0) -> bytes:
    """Simple reply header; for a successful READ the caller sends the data right after it."""
    return _SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, error, cookie)


def structured_chunk(cookie: int, flags: int, chunk_type: int, payload: bytes = b"") -> bytes:
    return _CHUNK.pack(NBD_STRUCTURED_REPLY_MAGIC, flags, chunk_type, cookie, len(payload)) + payload


def offset_data_header(cookie: int, offset: int, length: int, done: bool) -> bytes:
    """OFFSET_DATA chunk header + offset; the caller sends `length` data bytes after it (no copy here)."""
    if length < 1:
        raise ValueError("OFFSET_DATA must carry at least one byte")
    return _CHUNK_OFFSET.pack(NBD_STRUCTURED_REPLY_MAGIC, done, NBD_REPLY_TYPE_OFFSET_DATA, cookie, 8 + length, offset)


def offset_hole_chunk(cookie: int, offset: int, length: int, done: bool) -> bytes:
    """OFFSET_HOLE chunk: `length` bytes at `offset` read as zeroes, sent without the zeroes."""
    if length < 1:
        raise ValueError("hole size must be nonzero")
    return _CHUNK_HOLE.pack(NBD_STRUCTURED_REPLY_MAGIC, done, NBD_REPLY_TYPE_OFFSET_HOLE, cookie, 12, offset, length)


def error_chunk(cookie: int, error: int, message: str = "", done: bool = True) -> bytes:
    """ERROR chunk: a whole-request failure with an optional human-readable message."""
    return _error(cookie, NBD_REPLY_TYPE_ERROR, error, message, b"", done)


def error_offset_chunk(cookie: int, error: int, offset: int, message: str = "", done: bool = True) -> bytes:
    """ERROR_OFFSET chunk: failure at a specific offset, letting the client keep earlier good data."""
    return _error(cookie, NBD_REPLY_TYPE_ERROR_OFFSET, error, message, _U64.pack(offset), done)


def _error(cookie: int, chunk_type: int, error: int, message: str, tail: bytes, done: bool) -> bytes:
    if not error:
        raise ValueError("error chunk needs a nonzero error")
    msg = _encode(message)
    n = 6 + len(msg) + len(tail)
    return _ERROR_HEAD.pack(NBD_STRUCTURED_REPLY_MAGIC, done, chunk_type, cookie, n, error, len(msg)) + msg + tail


def block_status_chunk(cookie: int, context_id: int, extents: list[tuple[int, int]], done: bool = True) -> bytes:
    """BLOCK_STATUS chunk for one context; extents are (length, status flags) pairs, lengths nonzero."""
    if not extents:
        raise ValueError("block status needs at least one extent")
    if any(length == 0 for length, _ in extents):
        raise ValueError("extent lengths must be nonzero")
    n = 1 + 2 * len(extents)
    payload = struct.pack(f">{n}I", context_id, *chain.from_iterable(extents))
    return _CHUNK.pack(NBD_STRUCTURED_REPLY_MAGIC, done, NBD_REPLY_TYPE_BLOCK_STATUS, cookie, len(payload)) + payload


def none_chunk(cookie: int) -> bytes:
    """NONE chunk with DONE: ends a structured reply whose earlier chunks were not marked final."""
    return _CHUNK.pack(NBD_STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, cookie, 0)
