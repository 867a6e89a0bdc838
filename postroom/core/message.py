"""Parse an RFC 5322 / MIME message once: header summary, text and HTML bodies, attachments.

Everything here is tolerant: mail from the internet is often malformed, and a message that
cannot be fully understood must still be stored, listed and read. No function in this module
raises on bad input; the worst case is an empty field.
"""

from __future__ import annotations

import binascii
import calendar
import html as html_module
import quopri
import re
from collections.abc import Iterator
from dataclasses import dataclass
from email.generator import BytesGenerator
from email.message import Message
from email.parser import BytesParser
from email.policy import EmailPolicy
from email.utils import parsedate_tz
from io import BytesIO
from typing import TYPE_CHECKING, Any, cast

from postroom.core.models import HeaderSummary

if TYPE_CHECKING:
    from email.message import EmailMessage

    _PolicyBase = EmailPolicy[EmailMessage]
else:
    _PolicyBase = EmailPolicy

__all__ = [
    "Attachment",
    "AttachmentInfo",
    "ParsedMessage",
    "attachment_part",
    "decode_bytes",
    "decode_header_text",
    "html_to_text",
    "make_snippet",
    "parse_message",
]

SNIPPET_LENGTH = 200
MAX_REFERENCES = 100  # keeps a record's header summary bounded; threading needs far fewer
_MAX_DEPTH = 64  # MIME nesting deeper than this is abuse, not mail
# Bounds on header values given to the stdlib's parsers, which are quadratic on some
# malformed input: longer values are read by the linear fallback, or truncated (MIME headers).
_MAX_STRUCTURED_HEADER = 1000
_MAX_MIME_HEADER = 2000
_MAX_REPEATED_FIELDS = 3  # occurrences of a field that should appear once (To, Cc...)
_MIME_HEADERS = frozenset({
    "content-type", "content-disposition", "content-transfer-encoding", "content-id",
})
_SNIPPET_HTML_LIMIT = 64_000  # enough HTML to find 200 characters of text in

_SURROGATE_RUN = re.compile("[\udc80-\udcff]+")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_NEWLINE = re.compile(r"\r\n?")
_CRLF = re.compile(r"[\r\n]+")
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=")
_BETWEEN_WORDS = re.compile(r"(\?=)\s+(=\?)")
_MSG_ID = re.compile(r"<([^<>]*)>")
_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/]")
_CTYPE_NOISE = re.compile(r"\([^)]*\)?|\s+")
_FILENAME_BAD = re.compile(r"[\x00-\x1f\x7f]")

# Labels seen in real mail that Python's codec registry does not know, or knows under a
# narrower name: WHATWG's encoding standard maps these the same way.
_CHARSET_ALIASES = {
    "iso-8859-1": "cp1252",
    "latin1": "cp1252",
    "latin-1": "cp1252",
    "us-ascii": "",
    "ascii": "",
    "unknown-8bit": "",
    "x-unknown": "",
    "unknown": "",
    "default": "",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "ks_c_5601-1987": "cp949",
    "iso-8859-8-i": "iso-8859-8",
    "x-mac-roman": "mac-roman",
    "macintosh": "mac-roman",
    "windows-874": "cp874",
    "x-sjis": "shift_jis",
    "utf8": "utf-8",
}


# --- the data --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AttachmentInfo:
    """One attachment as listed with a message; `index` is its place in walk order from 0.

    `content_id` is bare (no angle brackets), as `cid:` URLs in HTML name it.
    `disposition` is "inline" or "attachment".
    """

    index: int
    filename: str
    content_type: str
    size: int
    content_id: str = ""
    disposition: str = "attachment"


@dataclass(frozen=True, slots=True)
class Attachment:
    """An attachment's decoded bytes, for download."""

    filename: str
    content_type: str
    data: bytes
    content_id: str = ""
    disposition: str = "attachment"


@dataclass(frozen=True, slots=True)
class ParsedMessage:
    """Everything listing, reading and indexing need, from one parse.

    `text` is the plain body (empty when the message only has HTML), `html` the HTML body
    unsanitised, both with \n line ends. `header_items` is every field in order, decoded.
    """

    headers: HeaderSummary
    text: str
    html: str
    attachments: tuple[AttachmentInfo, ...]
    snippet: str
    has_attachments: bool
    header_items: tuple[tuple[str, str], ...]


# --- text decoding ---------------------------------------------------------------------------


def _decode_8bit(data: bytes) -> str:
    """Bytes with no (trustworthy) charset: UTF-8 when they are valid UTF-8, else Windows-1252."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def decode_bytes(data: bytes, charset: str | None) -> str:
    """Decode body or header bytes in their declared charset, never raising.

    A missing, unknown or non-text charset falls back to UTF-8 then Windows-1252; bytes that
    are invalid in a known charset become U+FFFD.
    """
    name = (charset or "").strip().strip("\"'").lower()
    name = _CHARSET_ALIASES.get(name, name)
    if not name:
        return _clean(_decode_8bit(data))
    try:
        return _clean(data.decode(name, "replace"))
    except Exception:  # LookupError, "not a text encoding", or a codec's own bug
        return _clean(_decode_8bit(data))


def _unescape_8bit(value: str) -> str:
    """Header text from BytesParser keeps raw 8-bit bytes as surrogate escapes: decode them."""
    if value.isascii() or not _SURROGATE_RUN.search(value):  # isascii: one C pass, no regex
        return value
    return _SURROGATE_RUN.sub(
        lambda m: _decode_8bit(bytes(ord(c) - 0xDC00 for c in m.group())), value
    )


def _clean(value: str) -> str:
    """Make a string safe to store anywhere: no surrogates (invalid in UTF-8), no NULs
    (PostgreSQL text refuses them)."""
    if value.isascii():  # nothing to unescape or replace: the usual case, and the cheap one
        return value.replace("\x00", "") if "\x00" in value else value
    value = _unescape_8bit(value)
    if _LONE_SURROGATE.search(value):
        value = _LONE_SURROGATE.sub("\ufffd", value)
    return value.replace("\x00", "") if "\x00" in value else value


def _decode_encoded_word(match: re.Match[str]) -> str:
    charset, encoding, payload = match.group(1), match.group(2).lower(), match.group(3)
    charset = charset.split("*", 1)[0]  # RFC 2231 §5 language suffix
    try:
        if encoding == "b":
            data = binascii.a2b_base64(payload + "=" * (-len(payload) % 4))
        else:
            data = binascii.a2b_qp(payload.encode("ascii", "replace"), header=True)
    except (binascii.Error, ValueError):
        return match.group()
    return decode_bytes(data, charset)


def decode_header_text(value: str) -> str:
    """RFC 2047 encoded words decoded by hand, for header values the stdlib could not parse.

    Unknown charsets and broken base64 degrade to replacement characters or the raw word.
    """
    value = _CRLF.sub("", _unescape_8bit(value))
    if "=?" in value:
        value = _BETWEEN_WORDS.sub(r"\1\2", value)  # RFC 2047 §6.2: space between words goes
        value = _ENCODED_WORD.sub(_decode_encoded_word, value)
    return _clean(value)


# --- the tolerant policy ---------------------------------------------------------------------


class _TolerantPolicy(_PolicyBase):
    """`email.policy.default`, except that reading a header never raises and stays cheap.

    The header registry raises on many malformed values (IndexError, AttributeError,
    HeaderParseError...), and BytesParser itself reads Content-Type while parsing, so one bad
    header could lose the whole message; it is also quadratic on some malformed values. So:

    - raw 8-bit bytes are decoded as UTF-8 or Windows-1252 first (RFC 6532 allows UTF-8;
      older mailers send Latin-1 unannounced);
    - MIME headers (Content-Type and friends) are kept as plain strings, as compat32 does:
      get_param and get_filename parse those themselves (RFC 2231 included), and the parser
      reads Content-Type several times per part;
    - other headers go through the registry, one at a time: a failure, or a value too long to
      parse in reasonable time, falls back to the raw value with its encoded words decoded.
    """

    def header_fetch_parse(self, name: str, value: str) -> Any:
        if hasattr(value, "name"):
            return value
        text = _CRLF.sub("", _unescape_8bit(value))
        if name.lower() in _MIME_HEADERS:
            return text.strip()[:_MAX_MIME_HEADER]
        if len(text) > _MAX_STRUCTURED_HEADER:
            return decode_header_text(text)
        try:
            header = self.header_factory(name, text)
            decoded = str(header)
        except Exception:
            return decode_header_text(text)
        if "\ufffd" in decoded and "=?" in text:
            # The registry gives up on encoded words in charsets it does not know;
            # decode_header_text guesses UTF-8 or Windows-1252 instead.
            fallback = decode_header_text(text)
            if fallback.count("\ufffd") < decoded.count("\ufffd"):
                return fallback
        return header


_POLICY = _TolerantPolicy()
# Serialising an embedded message back to bytes: headers verbatim, 8-bit bytes as they were.
_VERBATIM = _POLICY.clone(refold_source="none", cte_type="8bit", linesep="\r\n")


def _parse(raw: bytes, *, headers_only: bool = False) -> Message:
    if not headers_only:
        simple = _parse_single_part(raw)
        if simple is not None:
            return simple
        try:
            return BytesParser(policy=_POLICY).parsebytes(raw)
        except Exception:  # e.g. RecursionError on absurd nesting: keep at least the headers
            pass
    try:
        return BytesParser(policy=_POLICY).parsebytes(raw, headersonly=True)
    except Exception:
        return Message(policy=_POLICY)


def _parse_single_part(raw: bytes) -> Message | None:
    """The parse of a message that is not multipart (nor message/*), without handing its body
    to the feed parser line by line (0.2 ms for 50 KB): the header block is parsed alone and
    the rest set as the payload, which is what the feed parser makes of such a body. None
    when the message is not that simple, or its header block does not end where the first
    CRLF CRLF is (a malformed line before it, bare LFs): then the full parse decides."""
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        return None
    try:
        msg = BytesParser(policy=_POLICY).parsebytes(raw[:end + 4], headersonly=True)
        if msg.get_payload() != "" or msg.get_content_maintype() in ("multipart", "message"):
            return None
    except Exception:
        return None
    msg.set_payload(raw[end + 4:].decode("ascii", "surrogateescape"))
    return msg


# --- reading headers -------------------------------------------------------------------------


def _header(part: Message, name: str) -> str:
    """The first `name` field, decoded (through the tolerant policy)."""
    try:
        value = part.get(name)
        return "" if value is None else _clean(_CRLF.sub("", str(value)))
    except Exception:
        return ""


def _raw_values(part: Message, name: str, limit: int = _MAX_REPEATED_FIELDS) -> list[str]:
    """The first `limit` values of field `name` as sent, unfolded; no registry involved."""
    wanted = name.lower()
    values = [value for key, value in part.raw_items() if key.lower() == wanted]
    return [_CRLF.sub("", value) for value in values[:limit]]


_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = _ATEXT + r"+(?:\." + _ATEXT + r"+)*"
# "Name Of Atoms <dot.atom@dot.atom>" or a bare dot.atom@dot.atom: most address fields
_SIMPLE_ADDRESS = re.compile(
    rf"[ \t]*(?:({_ATEXT}+(?: {_ATEXT}+)*) <({_DOT_ATOM}@{_DOT_ATOM})>"
    rf"|({_DOT_ATOM}@{_DOT_ATOM}))[ \t]*"
)


def _simple_address(value: str) -> str | None:
    """What the header registry shows for the simplest address fields (three in four of the
    corpus's), without its parser (~100 us a field); None for anything else."""
    if "=?" in value:  # encoded words are atext too
        return None
    match = _SIMPLE_ADDRESS.fullmatch(value)
    if match is None:
        return None
    bare = match.group(3)
    return bare if bare is not None else f"{match.group(1)} <{match.group(2)}>"


def _addresses(part: Message, name: str) -> str:
    """An address field for display: "Name <a@b>, ...", encoded words decoded.

    Only the first few occurrences count (RFC 5322 §3.6 allows one); each is parsed alone.
    """
    shown = []
    for value in _raw_values(part, name):
        simple = _simple_address(value)
        if simple is not None:
            shown.append(simple)
            continue
        try:
            text = str(_POLICY.header_fetch_parse(name, value))
        except Exception:
            text = decode_header_text(value)
        text = _clean(text).strip()
        if text:
            shown.append(text)
    return ", ".join(shown)


def _msg_ids(value: str) -> list[str]:
    ids = []
    for match in _MSG_ID.finditer(value):
        inner = "".join(match.group(1).split())
        if inner:
            ids.append(f"<{inner}>")
    if not ids:
        bare = value.strip()
        if bare and not any(c.isspace() or c in "<>" for c in bare):
            ids.append(f"<{bare}>")  # some mailers forget the angle brackets
    return ids


def _date(value: str) -> float | None:
    """RFC 5322 §3.3 date (obsolete forms included) as a unix time, or None."""
    try:
        parsed = parsedate_tz(value)
        if parsed is None:
            return None
        # A missing or "-0000" zone means local time unknown: read it as UTC.
        seconds = calendar.timegm(parsed[:9])
        return float(seconds - (parsed[9] or 0))
    except Exception:  # a year out of range, an absurd zone offset...
        return None


def _header_summary(msg: Message) -> HeaderSummary:
    def raw(name: str) -> str:
        values = _raw_values(msg, name, 1)
        return decode_header_text(values[0]) if values else ""

    in_reply_to = _msg_ids(raw("in-reply-to"))
    preferred = [i for i in in_reply_to if "@" in i] or in_reply_to
    references = _msg_ids(
        " ".join(decode_header_text(v) for v in _raw_values(msg, "references"))
    )
    message_id = _msg_ids(raw("message-id"))
    return HeaderSummary(
        from_=_addresses(msg, "from"),
        to=_addresses(msg, "to"),
        cc=_addresses(msg, "cc"),
        bcc=_addresses(msg, "bcc"),
        subject=_header(msg, "subject"),
        date=_date(raw("date")),
        message_id=message_id[0] if message_id else "",
        in_reply_to=preferred[0] if preferred else "",
        references=tuple(references[-MAX_REFERENCES:]),
    )


def _header_items(msg: Message) -> tuple[tuple[str, str], ...]:
    """Every field in order, as sent but decoded (encoded words, raw 8-bit); linear time."""
    return tuple((_clean(name), decode_header_text(value)) for name, value in msg.raw_items())


# --- walking the MIME tree -------------------------------------------------------------------


@dataclass(slots=True)
class _Part:
    """One MIME part with the facts the walk needs, each read from its headers once."""

    message: Message
    content_type: str
    disposition: str  # "inline", "attachment" or "" as the header says
    filename: str
    content_id: str
    children: list[_Part] | None  # None for a leaf; message/* parts are leaves


def _content_type(part: Message) -> str:
    try:
        ctype = part.get_content_type()
    except Exception:
        return "text/plain"
    # Content-Type is read compat32-style (see _TolerantPolicy): drop comments and spaces.
    return _CTYPE_NOISE.sub("", ctype) if ("(" in ctype or " " in ctype) else ctype


def _disposition(part: Message) -> str:
    try:
        return (part.get_content_disposition() or "").strip()
    except Exception:
        return ""


def _unquote(value: str) -> str:
    # Only a quoted-string is unquoted: email.utils.unquote would also eat "<...>".
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def _param(part: Message, name: str, header: str) -> str | None:
    try:
        value = part.get_param(name, None, header=header, unquote=False)
    except Exception:
        return None
    if isinstance(value, tuple):  # RFC 2231 §4: (charset, language, percent-decoded text)
        charset, _, text = value
        raw = _unquote(str(text)).encode("latin-1", "replace")
        return decode_bytes(raw, charset or None)
    return None if value is None else _unquote(str(value))


def _filename(part: Message) -> str:
    name = _param(part, "filename", "content-disposition")
    if name is None:
        name = _param(part, "name", "content-type") or ""
    if "=?" in name:  # RFC 2047 inside a parameter: not allowed, sent by Outlook and others
        name = decode_header_text(name)
    name = _clean(name)
    # A name for a download, never a path: keep the last component, drop control characters.
    name = name.replace("\t", " ").replace("\\", "/").rsplit("/", 1)[-1]
    name = _FILENAME_BAD.sub("", name).strip()
    return name[:255]


def _content_id(part: Message) -> str:
    value = _header(part, "content-id").strip()
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1]
    return "".join(value.split())


def _subparts(message: Message) -> list[Message]:
    # is_multipart() (a list payload) holds for multipart/* and message/* alike. Only that
    # form of get_payload is safe: the string form decodes by the declared charset and
    # raises for some codecs.
    if not message.is_multipart():
        return []
    payload = message.get_payload()
    return [p for p in payload if isinstance(p, Message)] if isinstance(payload, list) else []


def _tree(message: Message, depth: int = 0) -> _Part:
    content_type = _content_type(message)
    children: list[_Part] | None = None
    if content_type.startswith("multipart/"):
        if message.is_multipart():
            # MIME nesting deeper than _MAX_DEPTH is abuse, not mail: its contents are dropped.
            children = [
                _tree(sub, depth + 1) for sub in _subparts(message)
            ] if depth < _MAX_DEPTH else []
        else:
            content_type = "text/plain"  # no boundary, or it never appears: the body is text
    return _Part(
        message=message,
        content_type=content_type,
        disposition=_disposition(message),
        filename=_filename(message),
        content_id=_content_id(message),
        children=children,
    )


def _leaves(root: _Part) -> Iterator[_Part]:
    """Leaf parts in walk order (depth first, as email.message.Message.walk)."""
    stack = [root]
    while stack:
        part = stack.pop()
        if part.children is None:
            yield part
        else:
            stack.extend(reversed(part.children))


def _bodies(part: _Part) -> tuple[list[_Part], list[_Part]]:
    """The text/plain and text/html parts that make up the message's body (RFC 2046 §5.1).

    multipart/alternative: the first plain and the last (richest) HTML alternative;
    multipart/related: only its root (RFC 2387 §3.2); any other multipart: every body part
    in order, as mail clients show sequential inline parts one after the other. A part with a
    filename or disposition "attachment" is never a body.
    """
    if part.children is None:
        if part.disposition == "attachment" or part.filename:
            return [], []
        if part.content_type == "text/plain":
            return [part], []
        if part.content_type == "text/html":
            return [], [part]
        return [], []
    plain: list[_Part] = []
    html: list[_Part] = []
    if part.content_type == "multipart/alternative":
        for sub in part.children:
            p, h = _bodies(sub)
            if p and not plain:
                plain = p
            if h:
                html = h
        return plain, html
    if part.content_type == "multipart/related":
        if not part.children:
            return [], []
        root = part.children[0]
        try:
            start = part.message.get_param("start")
        except Exception:
            start = None
        if isinstance(start, str) and start.strip():
            wanted = start.strip().strip("<>")
            root = next((s for s in part.children if s.content_id == wanted), root)
        return _bodies(root)
    for sub in part.children:
        p, h = _bodies(sub)
        plain.extend(p)
        html.extend(h)
    return plain, html


def _flatten(message: Message) -> bytes:
    out = BytesIO()
    try:
        generator = BytesGenerator(out, mangle_from_=False, policy=_VERBATIM)
        generator.flatten(cast("EmailMessage", message), unixfrom=False)
        return out.getvalue()
    except Exception:
        try:
            return message.as_bytes(policy=_VERBATIM)
        except Exception:
            return b""


def _undo_transfer_encoding(data: bytes, cte: str) -> bytes:
    if cte == "quoted-printable":
        return quopri.decodestring(data)
    alphabet_only = _NOT_BASE64.sub(b"", data.split(b"=", 1)[0])
    if len(alphabet_only) % 4 == 1:  # one character too many can never be valid: drop it
        alphabet_only = alphabet_only[:-1]
    try:
        return binascii.a2b_base64(alphabet_only + b"=" * (-len(alphabet_only) % 4))
    except (binascii.Error, ValueError):
        return data


def _payload_bytes(part: Message) -> bytes:
    """A leaf's content with its transfer encoding undone."""
    if part.is_multipart():  # message/rfc822, message/delivery-status...
        data = b"".join(_flatten(m) for m in _subparts(part))
        cte = _header(part, "content-transfer-encoding").strip().lower()
        if cte in ("base64", "quoted-printable"):  # forbidden by RFC 2046 §5.2.1, yet sent
            data = _undo_transfer_encoding(data.lstrip(b"\r\n"), cte)
        return data
    try:
        decoded = part.get_payload(decode=True)
    except Exception:
        return b""
    return decoded if isinstance(decoded, bytes) else b""


def _part_text(part: Message) -> str:
    try:
        charset = part.get_content_charset()
    except Exception:
        charset = None
    return _NEWLINE.sub("\n", decode_bytes(_payload_bytes(part), charset))


def _attachment_filename(part: _Part) -> str:
    if part.filename or part.content_type not in ("message/rfc822", "message/global"):
        return part.filename
    # RFC 2046 §5.2.1: a forwarded message is one attachment; name it after its subject.
    inner = _subparts(part.message)
    subject = _header(inner[0], "subject") if inner else ""
    if not subject and _header(part.message, "content-transfer-encoding").strip().lower() in (
        "base64", "quoted-printable",
    ):
        subject = _header(_parse(_payload_bytes(part.message), headers_only=True), "subject")
    subject = _FILENAME_BAD.sub("", subject.replace("/", "_").replace("\\", "_")).strip()
    return f"{subject[:200] or 'message'}.eml"


@dataclass(slots=True)
class _Survey:
    text_parts: list[_Part]
    html_parts: list[_Part]
    attachments: list[tuple[AttachmentInfo, _Part]]


def _survey(msg: Message) -> _Survey:
    """Bodies and attachments, numbered in walk order; parse_message and attachment_part
    both come through here so their numbering always agrees."""
    root = _tree(msg)
    text_parts, html_parts = _bodies(root)
    body_ids = {id(p) for p in (*text_parts, *html_parts)}
    attachments: list[tuple[AttachmentInfo, _Part]] = []
    for part in _leaves(root):
        if id(part) in body_ids:
            continue
        if (
            part.disposition != "attachment"
            and not part.filename
            and part.content_type in ("text/plain", "text/html")
        ):
            continue  # an alternative we did not choose, not a file
        disposition = part.disposition
        if disposition not in ("inline", "attachment"):
            disposition = "inline" if part.content_id else "attachment"
        info = AttachmentInfo(
            index=len(attachments),
            filename=_attachment_filename(part),
            content_type=part.content_type,
            size=len(_payload_bytes(part.message)),
            content_id=part.content_id,
            disposition=disposition,
        )
        attachments.append((info, part))
    return _Survey(text_parts, html_parts, attachments)


# --- HTML to text ----------------------------------------------------------------------------

_SKIPPED_ELEMENTS = frozenset({"script", "style", "title", "template"})
_BLOCK_ELEMENTS = frozenset({
    "address", "article", "aside", "blockquote", "br", "dd", "div", "dl", "dt", "footer",
    "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "li", "ol", "p", "pre", "section",
    "table", "tr", "ul",
})
_TAG_NAME = re.compile(r"<(/?)([a-z][a-z0-9:-]*)")
_TAG_END_OR_VALUE = re.compile(r"[>=]")
_SPACES = re.compile(r"[ \t\f\v\xa0]+")
_BLANK_LINES = re.compile(r"\n\s*\n\s*")


def _strip_tags(html: str) -> Iterator[str]:
    """Text runs and line breaks of an HTML document, in linear time.

    A hand-written scanner rather than html.parser: the stdlib parser goes quadratic on some
    malformed input (runs of unclosed "<a" or "<!--"), and every incoming message's snippet
    comes through here. Like a browser, an unclosed comment or tag swallows the rest.
    """
    lower = html.lower()
    size = len(html)
    i = 0
    while i < size:
        lt = html.find("<", i)
        if lt < 0:
            yield html_module.unescape(html[i:])
            return
        if lt > i:
            yield html_module.unescape(html[i:lt])
        if lower.startswith("<!--", lt):
            end = html.find("-->", lt + 4)
            i = size if end < 0 else end + 3
            continue
        match = _TAG_NAME.match(lower, lt)
        if match is None:
            if lower.startswith(("<!", "<?"), lt):  # doctype, CDATA, processing instruction
                end = html.find(">", lt)
                i = size if end < 0 else end + 1
            else:  # a bare "<" is text
                yield "<"
                i = lt + 1
            continue
        # Find the tag's end, stepping over quoted attribute values (which may hold ">").
        j = match.end()
        while True:
            found = _TAG_END_OR_VALUE.search(html, j)
            if found is None:
                return
            j = found.end()
            if found.group() == ">":
                break
            while j < size and html[j] in " \t\r\n\f":
                j += 1
            if j < size and html[j] in "\"'":
                close = html.find(html[j], j + 1)
                if close < 0:
                    return
                j = close + 1
        i = j
        closing, name = match.group(1), match.group(2)
        if name in _BLOCK_ELEMENTS:
            yield "\n"
        elif name in ("td", "th"):
            yield " "
        elif name in _SKIPPED_ELEMENTS and not closing:
            end = lower.find("</" + name, i)
            i = size if end < 0 else end


def html_to_text(html: str) -> str:
    """Readable text from HTML: tags dropped, script and style contents skipped, entities
    decoded, block elements on their own lines. Never raises; linear in the input."""
    text = _SPACES.sub(" ", "".join(_strip_tags(html)))
    text = "\n".join(line.strip() for line in text.split("\n"))
    return _clean(_BLANK_LINES.sub("\n\n", text).strip())


def make_snippet(text: str, length: int = SNIPPET_LENGTH) -> str:
    """The first `length` characters of `text` with all whitespace collapsed to single spaces."""
    words: list[str] = []
    size = 0
    for match in re.finditer(r"\S+", text):
        words.append(match.group())
        size += len(match.group()) + 1
        if size > length:
            break
    return " ".join(words)[:length].rstrip()


# --- the public entry points -----------------------------------------------------------------


def parse_message(raw: bytes) -> ParsedMessage:
    """Parse a message's bytes once into everything a listing, a reader and search need."""
    msg = _parse(raw)
    survey = _survey(msg)
    text = "\n".join(_part_text(p.message) for p in survey.text_parts)
    html = "\n".join(_part_text(p.message) for p in survey.html_parts)
    if text.strip():
        snippet = make_snippet(text)
    elif html:
        snippet = make_snippet(html_to_text(html[:_SNIPPET_HTML_LIMIT]))
    else:
        snippet = ""
    infos = tuple(info for info, _ in survey.attachments)
    has_attachments = any(
        a.disposition == "attachment" or (a.filename and not a.content_type.startswith("text/"))
        for a in infos
    )
    return ParsedMessage(
        headers=_header_summary(msg),
        text=text,
        html=html,
        attachments=infos,
        snippet=snippet,
        has_attachments=has_attachments,
        header_items=_header_items(msg),
    )


def attachment_part(raw: bytes, index: int) -> Attachment | None:
    """Attachment `index` (as numbered by `parse_message`) with its decoded bytes, or None."""
    if index < 0:
        return None
    attachments = _survey(_parse(raw)).attachments
    if index >= len(attachments):
        return None
    info, part = attachments[index]
    return Attachment(
        filename=info.filename,
        content_type=info.content_type,
        data=_payload_bytes(part.message),
        content_id=info.content_id,
        disposition=info.disposition,
    )
