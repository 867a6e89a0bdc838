"""The MIME structure of a stored message, by byte offsets into its raw octets.

IMAP serves exactly the bytes that were received, so BODY[1.2], BODY[2.MIME], HEADER.FIELDS and
BODYSTRUCTURE sizes are all slices of the raw message: nothing is re-encoded. Parsing is
tolerant (RFC 3501 §6.4.5 asks for the structure of real-world mail, not an error): a missing
boundary leaves a single part, an unterminated multipart ends at the end of its parent, a part
with no blank line is all header.
"""

from __future__ import annotations

import base64
import binascii
import quopri
import re
from collections import OrderedDict
from dataclasses import dataclass, field

from postroom.imap.response import nstring, string

_MAX_DEPTH = 50
_TSPECIALS = '()<>@,;:\\"/[]?='


@dataclass(slots=True)
class Field:
    name: str  # lower case
    raw: bytes  # the whole field as received, with its folding and line end

    @property
    def value(self) -> bytes:
        """The unfolded value after the colon, without surrounding whitespace."""
        colon = self.raw.find(b":")
        value = self.raw[colon + 1 :]
        return re.sub(rb"\r?\n(?=[ \t])", b"", value).strip(b" \t\r\n")


@dataclass(slots=True)
class Part:
    start: int  # offset of the part's header
    body_start: int
    end: int
    fields: list[Field]
    type: str = "text"
    subtype: str = "plain"
    params: list[tuple[str, str]] = field(default_factory=list)
    children: list[Part] = field(default_factory=list)
    message: Part | None = None  # the encapsulated message of a message/rfc822 part

    @property
    def size(self) -> int:
        return self.end - self.body_start

    def header(self, name: str) -> Field | None:
        for f in self.fields:
            if f.name == name:
                return f
        return None

    def header_value(self, name: str) -> bytes | None:
        f = self.header(name)
        return f.value if f is not None else None

    def param(self, name: str) -> str | None:
        for key, value in self.params:
            if key == name:
                return value
        return None


def _header_end(raw: bytes, start: int, end: int) -> int:
    """Where the body begins: after the blank line ending the header (end when none)."""
    if raw.startswith(b"\r\n", start):
        return start + 2
    if raw.startswith(b"\n", start):
        return start + 1
    a = raw.find(b"\n\r\n", start, end)
    b = raw.find(b"\n\n", start, end)
    candidates = [(a, 3), (b, 2)]
    found = [(pos, n) for pos, n in candidates if pos >= 0]
    if not found:
        return end
    pos, n = min(found)
    return pos + n


def _fields(raw: bytes, start: int, stop: int) -> list[Field]:
    out: list[Field] = []
    pos = start
    current_start = -1
    current_name = ""
    while pos < stop:
        nl = raw.find(b"\n", pos, stop)
        line_end = stop if nl < 0 else nl + 1
        line = raw[pos:line_end]
        if line in (b"\r\n", b"\n"):
            break
        if line[:1] in (b" ", b"\t") and current_start >= 0:
            pos = line_end
            continue
        if current_start >= 0:
            out.append(Field(current_name, raw[current_start:pos]))
            current_start = -1
        colon = line.find(b":")
        if colon > 0:
            name = line[:colon].strip()
            if name and all(33 <= c <= 126 for c in name):
                current_start = pos
                current_name = name.decode("ascii").lower()
        pos = line_end
    if current_start >= 0:
        out.append(Field(current_name, raw[current_start:pos]))
    return out


# -- header value syntax: Content-Type and friends (RFC 2045, RFC 2231) -------------------------


def _strip_comments(text: str) -> str:
    out: list[str] = []
    depth = 0
    quoted = False
    escaped = False
    for ch in text:
        if escaped:
            escaped = False
            if depth == 0:
                out.append(ch)
            continue
        if ch == "\\":
            escaped = True
            if depth == 0:
                out.append(ch)
            continue
        if quoted:
            if ch == '"':
                quoted = False
            out.append(ch)
            continue
        if ch == '"' and depth == 0:
            quoted = True
            out.append(ch)
        elif ch == "(":
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
        elif depth == 0:
            out.append(ch)
    return "".join(out)


def _split_params(text: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    escaped = False
    for ch in text:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\" and quoted:
            current.append(ch)
            escaped = True
        elif ch == '"':
            quoted = not quoted
            current.append(ch)
        elif ch == ";" and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def parse_params(items: list[str]) -> list[tuple[str, str]]:
    """attribute=value pairs, with RFC 2231 continuations joined.

    `name*0`, `name*1`... become `name`; an extended (charset'language'%XX) value stays
    encoded under `name*`, for the client to decode, as the section numbers of BODYSTRUCTURE
    let it do.
    """
    plain: list[tuple[str, str]] = []
    continued: dict[str, dict[int, tuple[bool, str]]] = {}
    order: list[str] = []
    for item in items:
        if "=" not in item:
            continue
        key, _, value = item.partition("=")
        key = key.strip().lower()
        if not key:
            continue
        value = _unquote(value)
        match = re.fullmatch(r"([^*]+)\*(\d{1,9})(\*?)", key)
        if match:
            base = match.group(1)
            if base not in continued:
                continued[base] = {}
                order.append(base)
            continued[base][int(match.group(2))] = (bool(match.group(3)), value)
            continue
        plain.append((key, value))
    for base in order:
        pieces = continued[base]
        numbers = sorted(pieces)
        extended = pieces[numbers[0]][0]
        joined = "".join(pieces[n][1] for n in numbers)
        plain.append((base + "*" if extended else base, joined))
    return plain


def _content_type(value: bytes | None, default: tuple[str, str]) -> tuple[
        str, str, list[tuple[str, str]]]:
    if value is None:
        return default[0], default[1], ([("charset", "us-ascii")] if default[0] == "text"
                                        else [])
    text = _strip_comments(value.decode("utf-8", "replace"))
    items = _split_params(text)
    kind = items[0].strip().lower()
    main, slash, sub = kind.partition("/")
    main, sub = main.strip(), sub.strip()
    valid = (slash and main and sub
             and not any(c in _TSPECIALS or c.isspace() for c in main + sub))
    params = parse_params(items[1:])
    if not valid:
        # RFC 2045 §5.2: an unreadable Content-Type means text/plain; charset=us-ascii.
        return "text", "plain", [("charset", "us-ascii")]
    return main, sub, params


def _disposition(value: bytes | None) -> tuple[str, list[tuple[str, str]]] | None:
    if value is None:
        return None
    items = _split_params(_strip_comments(value.decode("utf-8", "replace")))
    kind = items[0].strip()
    if not kind:
        return None
    return kind, parse_params(items[1:])


# -- the tree --------------------------------------------------------------------------------


def parse(raw: bytes) -> Part:
    """The structure of a whole message."""
    return _part(raw, 0, len(raw), ("text", "plain"), 0)


def _part(raw: bytes, start: int, end: int, default: tuple[str, str], depth: int) -> Part:
    body_start = _header_end(raw, start, end)
    fields = _fields(raw, start, body_start)
    main, sub, params = _content_type(
        next((f.value for f in fields if f.name == "content-type"), None), default)
    part = Part(start, body_start, end, fields, main, sub, params)
    if depth >= _MAX_DEPTH:
        return part
    if main == "multipart":
        boundary = part.param("boundary")
        if boundary:
            child_default = ("message", "rfc822") if sub == "digest" else ("text", "plain")
            spans = _split_multipart(raw, body_start, end, boundary.encode("utf-8", "replace"))
            part.children = [_part(raw, s, e, child_default, depth + 1) for s, e in spans]
        if not part.children:
            # Not a usable multipart: a single part of text, as RFC 2046 §5.1.7 suggests.
            part.type, part.subtype, part.params = "text", "plain", [("charset", "us-ascii")]
    elif main == "message" and sub in ("rfc822", "global"):
        encoding = (part.header_value("content-transfer-encoding") or b"7bit").lower()
        if encoding in (b"7bit", b"8bit", b"binary"):
            part.message = _part(raw, body_start, end, ("text", "plain"), depth + 1)
    return part


def _split_multipart(raw: bytes, start: int, end: int, boundary: bytes) -> list[tuple[int, int]]:
    """Spans of the body parts between the delimiter lines (RFC 2046 §5.1.1)."""
    marker = b"--" + boundary
    spans: list[tuple[int, int]] = []
    part_start = -1
    pos = start
    while True:
        hit = raw.find(marker, pos, end)
        if hit < 0:
            break
        at_line_start = hit == start or raw[hit - 1] == 0x0A
        after = hit + len(marker)
        closing = raw.startswith(b"--", after)
        tail = after + 2 if closing else after
        nl = raw.find(b"\n", tail, end)
        line_rest = raw[tail : end if nl < 0 else nl]
        if not at_line_start or (line_rest.strip(b" \t\r") != b"" and not closing):
            pos = after
            continue
        # the line break before the delimiter belongs to the delimiter
        delim_start = hit
        if hit > start and raw[hit - 1] == 0x0A:
            delim_start = hit - 2 if hit - 2 >= start and raw[hit - 2] == 0x0D else hit - 1
        if part_start >= 0:
            spans.append((part_start, max(part_start, delim_start)))
        if closing:
            return spans
        part_start = end if nl < 0 else nl + 1
        pos = part_start
    if part_start >= 0:
        spans.append((part_start, end))
    return spans


def find_part(root: Part, path: list[int]) -> Part | None:
    """The part a section number names (RFC 3501 §6.4.5), or None."""
    part = root
    for i, n in enumerate(path):
        if i > 0 and part.message is not None:
            part = part.message
        if part.children:
            if not 1 <= n <= len(part.children):
                return None
            part = part.children[n - 1]
        elif n != 1:
            return None
    return part


# -- FETCH data ---------------------------------------------------------------------------------


def count_lines(data: bytes) -> int:
    if not data:
        return 0
    return data.count(b"\n") + (0 if data.endswith(b"\n") else 1)


def header_fields(raw: bytes, part: Part, names: list[str], exclude: bool) -> bytes:
    """HEADER.FIELDS (names) or HEADER.FIELDS.NOT (names), with the blank line."""
    wanted = {n.lower() for n in names}
    picked = [f.raw for f in part.fields if (f.name in wanted) != exclude]
    out = b"".join(p if p.endswith(b"\n") else p + b"\r\n" for p in picked)
    return out + b"\r\n"


def _params(params: list[tuple[str, str]]) -> bytes:
    if not params:
        return b"NIL"
    return b"(" + b" ".join(string(k) + b" " + string(v) for k, v in params) + b")"


def _text(value: bytes | None) -> bytes:
    return nstring(value)


def bodystructure(raw: bytes, part: Part, extended: bool = True) -> bytes:
    """BODYSTRUCTURE (extended) or BODY (basic) of a part (RFC 3501 §7.4.2)."""
    if part.children:
        inner = b"".join(bodystructure(raw, c, extended) for c in part.children)
        out = b"(" + inner + b" " + string(part.subtype)
        if extended:
            out += b" " + _params(part.params) + b" " + _extension(part)
        return out + b")"
    fields = [
        string(part.type), string(part.subtype), _params(part.params),
        _text(part.header_value("content-id")), _text(part.header_value("content-description")),
        string((part.header_value("content-transfer-encoding") or b"7bit").decode(
            "ascii", "replace")),
        str(part.size).encode(),
    ]
    body = raw[part.body_start : part.end]
    if part.message is not None:
        fields += [envelope(part.message), bodystructure(raw, part.message, extended),
                   str(count_lines(body)).encode()]
    elif part.type == "text":
        fields.append(str(count_lines(body)).encode())
    if extended:
        fields += [_text(part.header_value("content-md5")), _extension(part)]
    return b"(" + b" ".join(fields) + b")"


def _extension(part: Part) -> bytes:
    """body-fld-dsp body-fld-lang body-fld-loc."""
    disposition = _disposition(part.header_value("content-disposition"))
    dsp = (b"(" + string(disposition[0]) + b" " + _params(disposition[1]) + b")"
           if disposition else b"NIL")
    lang_value = part.header_value("content-language")
    if lang_value:
        tags = [t.strip() for t in _strip_comments(lang_value.decode("utf-8", "replace"))
                .split(",") if t.strip()]
        lang = (string(tags[0]) if len(tags) == 1
                else b"(" + b" ".join(string(t) for t in tags) + b")") if tags else b"NIL"
    else:
        lang = b"NIL"
    return dsp + b" " + lang + b" " + _text(part.header_value("content-location"))


# -- ENVELOPE ---------------------------------------------------------------------------------


def envelope(part: Part) -> bytes:
    """ENVELOPE (RFC 3501 §7.4.2): the raw header values, addresses parsed into lists."""
    def value(name: str) -> bytes:
        return _text(part.header_value(name))

    from_ = part.header_value("from")
    sender = part.header_value("sender") or from_
    reply_to = part.header_value("reply-to") or from_
    items = [
        value("date"), value("subject"), address_list(from_), address_list(sender),
        address_list(reply_to), address_list(part.header_value("to")),
        address_list(part.header_value("cc")), address_list(part.header_value("bcc")),
        value("in-reply-to"), value("message-id"),
    ]
    return b"(" + b" ".join(items) + b")"


@dataclass(frozen=True, slots=True)
class Address:
    """One address of ENVELOPE: a mailbox, or a group's start (host None) or end (all None)."""

    name: str | None
    route: str | None
    mailbox: str | None
    host: str | None

    def encode(self) -> bytes:
        return (b"(" + nstring(self.name) + b" " + nstring(self.route) + b" "
                + nstring(self.mailbox) + b" " + nstring(self.host) + b")")


_ADDR_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"?|[<>,:;@]|[^\s<>,:;@"]+|\s+')


def _tokens(text: str) -> list[str]:
    """Address tokens; a comment becomes one token starting with NUL (its text follows)."""
    out: list[str] = []
    plain: list[str] = []
    depth = 0
    comment: list[str] = []
    quoted = escaped = False
    for ch in text:
        if depth:
            if escaped:
                escaped = False
                comment.append(ch)
            elif ch == "\\":
                escaped = True
            elif ch == "(":
                depth += 1
                comment.append(ch)
            elif ch == ")":
                depth -= 1
                if depth:
                    comment.append(ch)
                else:
                    out.extend(_ADDR_TOKEN.findall("".join(plain)))
                    plain = []
                    out.append("\0" + "".join(comment).strip())
                    comment = []
            else:
                comment.append(ch)
            continue
        if quoted:
            plain.append(ch)
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
            continue
        if ch == '"':
            quoted = True
        elif ch == "(":
            depth = 1
            continue
        plain.append(ch)
    out.extend(_ADDR_TOKEN.findall("".join(plain)))
    return out


def parse_addresses(value: bytes) -> list[Address]:
    """RFC 5322 address-list, tolerant of what real mail sends."""
    text = value.decode("utf-8", "surrogateescape")
    tokens = _tokens(text)
    out: list[Address] = []
    current: list[str] = []
    in_group = False
    angle = 0
    for tok in tokens:
        if tok == "<":
            angle += 1
        elif tok == ">" and angle:
            angle -= 1
        if angle == 0 and tok == ":" and not in_group and "<" not in current \
                and "@" not in current:
            name = _phrase([t for t in current if not t.startswith("\0")])
            out.append(Address(None, None, name or "", None))
            in_group = True
            current = []
            continue
        if angle == 0 and tok == ";" and in_group:
            mailbox = _mailbox(current)
            if mailbox is not None:
                out.append(mailbox)
            out.append(Address(None, None, None, None))
            in_group = False
            current = []
            continue
        if angle == 0 and tok == ",":
            mailbox = _mailbox(current)
            if mailbox is not None:
                out.append(mailbox)
            current = []
            continue
        current.append(tok)
    mailbox = _mailbox(current)
    if mailbox is not None:
        out.append(mailbox)
    if in_group:
        out.append(Address(None, None, None, None))
    return out


def _phrase(tokens: list[str]) -> str:
    words: list[str] = []
    for tok in tokens:
        if tok.isspace():
            if words and words[-1] != " ":
                words.append(" ")
        elif tok.startswith('"'):
            inner = tok[1:-1] if len(tok) >= 2 and tok.endswith('"') else tok[1:]
            words.append(re.sub(r"\\(.)", r"\1", inner))
        else:
            words.append(tok)
    while words and words[-1] == " ":
        words.pop()
    while words and words[0] == " ":
        words.pop(0)
    return "".join(words)


def _mailbox(tokens: list[str]) -> Address | None:
    comments = [t[1:] for t in tokens if t.startswith("\0")]
    tokens = [t for t in tokens if not t.startswith("\0")]
    if not any(not t.isspace() for t in tokens):
        return None
    if "<" in tokens:
        open_at = tokens.index("<")
        close_at = tokens.index(">", open_at) if ">" in tokens[open_at:] else len(tokens)
        name = _phrase(tokens[:open_at]) or None
        spec = tokens[open_at + 1 : close_at]
    else:
        name = None
        spec = tokens
    spec = [t for t in spec if not t.isspace()]
    route = None
    if ":" in spec:  # obs-route: @a,@b:user@host
        colon = spec.index(":")
        route = "".join(spec[:colon]) or None
        spec = spec[colon + 1 :]
    if "@" in spec:
        at = len(spec) - 1 - spec[::-1].index("@")
        local = "".join(spec[:at])
        host = "".join(spec[at + 1 :])
    else:
        local = "".join(spec)
        host = ""
    if name is None and comments and comments[-1]:
        name = comments[-1]  # "addr (Full Name)": the comment is the only name there is
    if not local and not host:
        if name is None:
            return None
        local = "MISSING_MAILBOX"
    return Address(name, route, local or "MISSING_MAILBOX", host or "MISSING_DOMAIN")


def address_list(value: bytes | None) -> bytes:
    if value is None:
        return b"NIL"
    addresses = parse_addresses(value)
    if not addresses:
        return b"NIL"
    return b"(" + b"".join(a.encode() for a in addresses) + b")"


# -- decoded text for SEARCH ------------------------------------------------------------------


def decoded_body(raw: bytes, part: Part) -> bytes:
    """A leaf part's body with its Content-Transfer-Encoding undone."""
    body = raw[part.body_start : part.end]
    encoding = (part.header_value("content-transfer-encoding") or b"").strip().lower()
    try:
        if encoding == b"base64":
            return base64.b64decode(re.sub(rb"[^A-Za-z0-9+/]", b"", body) + b"===")
        if encoding == b"quoted-printable":
            return quopri.decodestring(body)
    except (binascii.Error, ValueError):
        return body
    return body


def text_leaves(part: Part) -> list[Part]:
    """The text/* parts, in order, through multiparts and encapsulated messages."""
    if part.children:
        out: list[Part] = []
        for child in part.children:
            out.extend(text_leaves(child))
        return out
    if part.message is not None:
        return text_leaves(part.message)
    return [part] if part.type == "text" else []


class StructureCache:
    """Parsed structures by blob hash: a message's bytes never change, so neither does this.

    It also keeps the bytes of recently appended or fetched small messages, so that a FETCH
    of a message read a moment ago needs no trip to the blob store (a thread hop each, which
    costs more than the read). Keyed by the content hash, an entry can only be what the
    asking user's own record names, whoever put it there.
    """

    def __init__(self, size: int = 2048, content_bytes: int = 32 << 20,
                 content_max: int = 256 << 10) -> None:
        self.size = size
        self._items: OrderedDict[str, Part] = OrderedDict()
        self.content_bytes = content_bytes  # bytes of message content kept at most
        self.content_max = content_max  # larger messages are not kept
        self._content: OrderedDict[str, bytes] = OrderedDict()
        self._content_total = 0

    def content(self, key: str) -> bytes | None:
        raw = self._content.get(key)
        if raw is not None:
            self._content.move_to_end(key)
        return raw

    def keep_content(self, key: str, raw: bytes) -> None:
        if len(raw) > self.content_max or key in self._content:
            return
        self._content[key] = raw
        self._content_total += len(raw)
        while self._content_total > self.content_bytes:
            _, dropped = self._content.popitem(last=False)
            self._content_total -= len(dropped)

    def get(self, key: str, raw: bytes) -> Part:
        part = self._items.get(key)
        if part is not None:
            self._items.move_to_end(key)
            return part
        part = parse(raw)
        self._items[key] = part
        if len(self._items) > self.size:
            self._items.popitem(last=False)
        return part
