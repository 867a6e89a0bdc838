"""What the classifier sees of a message: a set of short feature strings, hashed to indices.

Features come from the whole message, not only its words: the header fields a mailer writes
(and their order and shape), the relay chain in Received, the authentication results, the
subject, the text and HTML bodies, link targets and attachments. Mail from other years and other
sources shares few words with a training set, but the way spam is sent (no Message-ID from the
sender's domain, a Reply-To elsewhere, HTML only, a freshly made-up HELO, a bulk mailer) carries
over much better than vocabulary does.

Each feature is a string with a short prefix saying where it came from (`s:` subject word,
`h:` header present, `u:` link domain...); a message's features are a set (presence, not
counts), hashed with CRC-32 into `2**bits` buckets: stable across processes and platforms, and
fast enough to keep the whole classifier above 500 messages/s with MIME parsing included.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Iterable

from postroom.core.message import ParsedMessage, html_to_text

BITS = 20
MAX_TEXT = 30_000  # characters of body text read; the start of a message says what it is
MAX_WORDS = 3_000

_WORD = re.compile(r"[^\W_]{2,24}|[$€£!]+")
_URL = re.compile(r"(?:https?://|www\.)([a-z0-9.-]+)", re.I)
# Addresses in body text, `[\w.+-]+@([a-z0-9.-]+\.[a-z]{2,})`, are found from each "@"
# (`_email_domains`): that regex run over the text backtracks through every run of word
# characters with no "@" after it, from each of its offsets: quadratic, ~6 ms of CPU for
# 50 KB of ordinary lines and 1.5 s for 30,000 letters in a row.
_EMAIL_LOCAL_END = re.compile(r"[\w.+-]", re.I)
_EMAIL_DOMAIN = re.compile(r"[a-z0-9.-]+\.[a-z]{2,}", re.I)
_IPV4 = re.compile(r"\[?(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})\]?")
_RCV_BY = re.compile(r"\bby\s+([^\s;()]+)", re.I)
_RCV_FROM = re.compile(r"^\s*from\s+([^\s;()]+)", re.I)
_RCV_WITH = re.compile(r"\bwith\s+([a-z0-9-]+)", re.I)
_TAG = re.compile(r"<\s*([a-z][a-z0-9]*)", re.I)
_AUTH_RESULT = re.compile(r"\b(spf|dkim|dmarc|arc|iprev|dnsbl)\s*=\s*([a-z]+)", re.I)
_CAPS_WORD = re.compile(r"\b[A-Z]{3,}\b")
_MONEY = re.compile(r"\$\s?\d")
_PERCENT = re.compile(r"\d\s?%")
_PHONE = re.compile(r"\b1?[-. (]*\d{3}[-. )]*\d{3}[-. ]*\d{4}\b")
_BANGS = re.compile(r"!{2,}")
_CAPS_RUN = re.compile(r"[A-Z]{3}")  # what every _CAPS_WORD match holds
_NO_DIGITS = str.maketrans("", "", "0123456789")
_OPT_OUT = re.compile(r"\b(remove|unsubscribe|opt.?out)\b", re.I)
_TZ = re.compile(r"([+-]\d{4}|\b[A-Z]{2,4}\b)\s*(?:\([^)]*\))?\s*$")

# Headers whose presence and shape are evidence; the value of the rest is ignored.
_MAILER_FIELDS = ("x-mailer", "user-agent", "x-mimeole", "x-msmail-priority", "x-priority")
# Headers added by whoever collected or delivered a message, not by its sender: they say
# nothing about the message, and a model that learnt them would learn the collection.
_LOCAL_FIELDS = frozenset({
    "return-path", "delivered-to", "x-spam-status", "x-spam-score", "x-spam-flag",
    "x-spam-level", "x-spam-checker-version", "x-postroom-spam", "status", "x-status",
    "x-keywords", "x-uid", "x-tuid", "content-length", "lines", "x-original-to",
})


def _bucket(n: int, edges: Iterable[int]) -> int:
    """The index of the first edge n is below: a coarse, monotone size class."""
    for i, edge in enumerate(edges):
        if n < edge:
            return i
    return -1


def _shape(text: str) -> str:
    """A string's shape: digits as 9, letters as a, runs collapsed (`ab12cd` -> `a9a`)."""
    out: list[str] = []
    for ch in text[:40]:
        c = "9" if ch.isdigit() else "a" if ch.isalpha() else ch
        if not out or out[-1] != c:
            out.append(c)
    return "".join(out)


def _domain_tail(domain: str, labels: int = 2) -> str:
    parts = [p for p in domain.lower().strip(".").split(".") if p]
    return ".".join(parts[-labels:])


def _address(value: str) -> tuple[str, str]:
    """(display name, address) from a decoded address field, tolerantly: what
    `<?([^<>\\s@]+@[^<>\\s@]+?)>?\\s*$` finds, read from the end of the field (that regex tried
    every start and scanned on from each: 45 s of CPU for a To: of 100,000 characters with no
    space or "@" in them, in the analysis process that scores mail before its SMTP 250)."""
    value = value.strip()
    if "," in value:
        value = value.split(",", 1)[0]
    text = value.rstrip()
    end = len(text) - 1 if text.endswith(">") else len(text)
    at = _run_start(text, end) - 1  # the domain runs back to an "@"
    if at < 0 or at == end - 1 or text[at] != "@":
        return value, ""
    local = _run_start(text, at)
    if local == at:
        return value, ""
    start = local - 1 if local > 0 and text[local - 1] == "<" else local
    addr = text[local:end].lower().strip("<>\"' ")
    name = value[:start].strip().strip('"').strip()
    return name, addr


def _tracking_tail(subject: str) -> bool:
    """Does the subject end in a word set off by three or more spaces, or in a number of three
    or more digits (in brackets or not)? What `\\s{3,}\\S+$` or `[#\\[(]?\\d{3,}[\\])]?\\s*$`
    finds, read from the end: those regexes, tried at every start, took minutes of CPU on a
    subject of 100,000 spaces or digits."""
    ends = [len(subject)] + ([len(subject) - 1] if subject.endswith("\n") else [])
    for end in ends:  # `$` is the end, or just before a newline that ends the text
        word = end
        while word > 0 and not subject[word - 1].isspace():
            word -= 1
        gap = word
        while gap > 0 and subject[gap - 1].isspace():
            gap -= 1
        if word < end and word - gap >= 3:
            return True
    tail = subject.rstrip()
    if tail.endswith(("]", ")")):
        tail = tail[:-1]
    digits = len(tail)
    while digits > 0 and tail[digits - 1].isdecimal():
        digits -= 1
    return len(tail) - digits >= 3


def _run_start(text: str, end: int) -> int:
    """Where the run of characters other than <, >, @ and white space ending at `end` starts."""
    start = end
    while start > 0 and text[start - 1] not in "<>@" and not text[start - 1].isspace():
        start -= 1
    return start


def _email_domains(text: str) -> list[str]:
    """The domains `finditer` of `[\\w.+-]+@([a-z0-9.-]+\\.[a-z]{2,})` yields, in linear time."""
    out: list[str] = []
    end = 0  # where the last match ended: the next local part starts at or after it
    at = text.find("@", 1)
    while at >= 0:
        if at > end and _EMAIL_LOCAL_END.match(text, at - 1) \
                and (match := _EMAIL_DOMAIN.match(text, at + 1)):
            out.append(match.group())
            end = match.end()
            at = text.find("@", end)
        else:
            at = text.find("@", at + 1)
    return out


def _url_hosts(text: str) -> list[str]:
    """The hosts `finditer` of `_URL` yields, trying the pattern only where a match can start
    (at "http" or "www.", found by `str.find`) instead of at every offset: 0.5 -> 0.04 ms for
    30,000 characters without links."""
    lowered = text.lower()
    if len(lowered) != len(text):  # a character lowered to two: offsets would not line up
        return [m.group(1) for m in _URL.finditer(text)]
    out: list[str] = []
    starts = {"http": lowered.find("http"), "www.": lowered.find("www.")}
    while True:
        due = [at for at in starts.values() if at >= 0]
        if not due:
            return out
        at = min(due)
        match = _URL.match(text, at)
        if match:
            out.append(match.group(1))
        end = match.end() if match else at + 1
        for prefix, found in starts.items():
            if 0 <= found < end:
                starts[prefix] = lowered.find(prefix, end)


def _words(text: str, prefix: str, out: set[str], limit: int = MAX_WORDS,
           pairs: bool = False) -> int:
    """Add each word (and with `pairs`, each pair of adjacent words); returns the count."""
    if not pairs:  # the same words, with the matching and the loop in C
        words = _WORD.findall(text)
        del words[limit:]
        # each distinct word once (a body repeats its words: 4,300 of them, a few hundred apart)
        out.update([prefix + ("#" * min(len(w), 6) if w.isdigit() else w) for w in set(words)])
        return len(words)
    count = 0
    last = ""
    for match in _WORD.finditer(text):
        word = match.group()
        if word.isdigit():
            word = "#" * min(len(word), 6)
        out.add(prefix + word)
        if pairs:
            out.add(f"{prefix}{last} {word}")
            last = word
        count += 1
        if count >= limit:
            break
    return count


def _caps_ratio(text: str) -> int:
    """Tenths of the first 2,000 characters' letters that are capitals (-1: under ten letters);
    counted by C loops (filter, map), not a Python loop per character."""
    letters = "".join(filter(str.isalpha, text[:2000]))
    if len(letters) < 10:
        return -1
    return int(10 * sum(map(str.isupper, letters)) / len(letters))


def received_features(received: list[str], out: set[str]) -> None:
    """The relay chain: hop count, how each hop was made, who handed it on and from where."""
    out.add(f"rcv:n{min(len(received), 12)}")
    for position, value in enumerate(received[:8]):
        where = "first" if position == len(received) - 1 else f"h{min(position, 3)}"
        by = _RCV_BY.search(value)
        if by:
            out.add(f"rcv:by:{_domain_tail(by.group(1))}")
        helo = _RCV_FROM.search(value)
        if helo:
            name = helo.group(1).lower()
            if _IPV4.fullmatch(name):
                out.add(f"rcv:{where}:helo-ip")
            elif "." not in name:
                out.add(f"rcv:{where}:helo-bare")
            else:
                out.add(f"rcv:helo:{_domain_tail(name)}")
        with_ = _RCV_WITH.search(value)
        if with_:
            out.add(f"rcv:{where}:with:{with_.group(1).lower()}")
        ips = _IPV4.findall(value)
        for a, b, _c, _d in ips[:2]:
            if a not in ("127", "10", "192"):
                out.add(f"rcv:ip:{a}.{b}")
        lowered = value.lower()
        if "may be forged" in lowered or "forged" in lowered:
            out.add("rcv:forged")
        if "unknown" in lowered:
            out.add(f"rcv:{where}:unknown")


def extract(parsed: ParsedMessage) -> set[str]:
    """The feature strings of one parsed message."""
    out: set[str] = set()
    fields: dict[str, list[str]] = {}
    previous = ""
    for name, value in parsed.header_items:
        key = name.lower()
        if key in _LOCAL_FIELDS:
            continue
        fields.setdefault(key, []).append(value)
        out.add("h:" + key)
        if key.startswith("x-") or key.startswith("list-"):
            out.add("hx:" + _shape(key))
        if previous and key not in ("received",):
            out.add(f"ho:{previous}>{key}")  # header order says which program wrote them
        previous = key if key != "received" else previous

    def first(key: str) -> str:
        values = fields.get(key)
        return values[0] if values else ""

    # Subject
    subject = parsed.headers.subject or first("subject")
    if not subject:
        out.add("s:<none>")
    _words(subject.lower(), "s:", out, 40)
    out.add(f"s:len{_bucket(len(subject), (1, 10, 25, 45, 70, 120))}")
    out.add(f"s:caps{_caps_ratio(subject)}")
    if re.match(r"\s*(re|fw|fwd|aw|sv)\s*:", subject, re.I):
        out.add("s:reply")
    if any(ord(c) > 127 for c in subject):
        out.add("s:8bit")
    if _tracking_tail(subject):
        out.add("s:tracking-tail")

    # From, Reply-To, To, Cc
    from_name, from_addr = _address(parsed.headers.from_ or first("from"))
    from_domain = from_addr.rpartition("@")[2]
    if from_addr:
        out.add("f:" + from_addr)
        out.add("fd:" + from_domain)
        out.add("fd2:" + _domain_tail(from_domain))
        out.add("fl:" + _shape(from_addr.partition("@")[0]))
    else:
        out.add("f:<none>")
    if from_name:
        _words(from_name.lower(), "fn:", out, 10)
        if "@" in from_name:
            out.add("fn:has-address")
        if from_name.isupper():
            out.add("fn:caps")
    else:
        out.add("fn:<none>")
    reply_to = _address(first("reply-to"))[1]
    if reply_to:
        rt_domain = reply_to.rpartition("@")[2]
        out.add("rt:same" if reply_to == from_addr else
                "rt:same-domain" if rt_domain == from_domain else "rt:other")
        out.add("rtd:" + _domain_tail(rt_domain))
    to = parsed.headers.to or first("to")
    recipients = to.count("@") + parsed.headers.cc.count("@")
    out.add(f"to:n{_bucket(recipients, (1, 2, 3, 6, 20))}")
    if not to:
        out.add("to:<none>")
    elif "undisclosed" in to.lower():
        out.add("to:undisclosed")
    to_addr = _address(to)[1]
    if to_addr and from_addr and to_addr == from_addr:
        out.add("to:is-from")
    if to_addr:
        out.add("tod:" + _domain_tail(to_addr.rpartition("@")[2]))

    # Message-ID, Date, mailer
    mid = (parsed.headers.message_id or first("message-id")).strip().strip("<>")
    if not mid:
        out.add("mid:<none>")
    else:
        local, _, mid_domain = mid.partition("@")
        out.add("mid:" + _shape(local)[:12])
        out.add("midd:" + _domain_tail(mid_domain))
        if from_domain and _domain_tail(mid_domain) == _domain_tail(from_domain):
            out.add("mid:from-domain")
    date = first("date")
    if not date:
        out.add("date:<none>")
    else:
        tz = _TZ.search(date)
        out.add("date:tz:" + (tz.group(1) if tz else "?"))
        out.add("date:" + _shape(re.sub(r"[A-Za-z]+", "a", date))[:24])
    for key in _MAILER_FIELDS:
        for value in fields.get(key, [])[:1]:
            out.add(f"{key}:{_shape(value.split('(')[0].strip())[:16]}")
            _words(value.lower(), f"{key}:", out, 6)
    for key in ("list-id", "list-unsubscribe", "precedence", "sender", "mailing-list"):
        for value in fields.get(key, [])[:1]:
            _words(value.lower(), f"{key}:", out, 8)

    # Relay chain and authentication
    received_features(fields.get("received", []), out)
    for key in ("authentication-results", "arc-authentication-results", "received-spf"):
        for value in fields.get(key, [])[:3]:
            for method, result in _AUTH_RESULT.findall(value):
                out.add(f"ar:{method.lower()}={result.lower()}")
            if key == "received-spf":
                out.add("ar:spf=" + value.strip().split(" ", 1)[0].lower())
    if "dkim-signature" in fields:
        out.add("dkim:signed")

    # MIME structure
    content_type = first("content-type").lower()
    out.add("ct:" + content_type.split(";")[0].strip()[:40])
    charset = re.search(r"charset\s*=\s*\"?([a-z0-9_-]+)", content_type)
    if charset:
        out.add("cs:" + charset.group(1))
    cte = first("content-transfer-encoding").lower().strip()
    if cte:
        out.add("cte:" + cte[:20])
    for attachment in parsed.attachments[:10]:
        out.add("att:" + attachment.content_type.lower()[:40])
        extension = attachment.filename.rpartition(".")[2].lower()
        if extension and len(extension) <= 5:
            out.add("att.ext:" + extension)

    # Bodies
    text = parsed.text[:MAX_TEXT]
    html = parsed.html[: MAX_TEXT * 3]
    if html:
        out.add("html:only" if not text.strip() else "html:alt")
        tags = {m.group(1).lower() for m in _TAG.finditer(html[:MAX_TEXT])}
        for tag in tags:
            out.add("tag:" + tag)
        if not text.strip():
            text = html_to_text(html)[:MAX_TEXT]
        for host in _url_hosts(html):
            out.add("u:" + _domain_tail(host))
            if _IPV4.fullmatch(host):
                out.add("u:ip-literal")
    lowered = text.lower()
    words = _words(lowered, "", out)
    out.add(f"b:words{_bucket(words, (5, 20, 60, 150, 400, 1000))}")
    out.add(f"b:caps{_caps_ratio(text)}")
    for host in _url_hosts(text):
        out.add("u:" + _domain_tail(host))
    for domain in _email_domains(lowered[:MAX_TEXT]):
        out.add("be:" + _domain_tail(domain))
    if ">" in text:
        quoted = sum(1 for line in text.splitlines() if line.startswith(">"))
        if quoted:
            out.add(f"b:quoted{_bucket(quoted, (1, 3, 10, 30))}")
    if "\n-- \n" in text or "\n--\n" in text:
        out.add("b:signature")
    if "=\n" in text:
        out.add("b:qp-residue")
    # The text's shape, in its own case: shouted words, sums of money, percentages, phone
    # numbers, runs of "!", and a way out (remove, unsubscribe) near the end.
    # (Each regex runs only where a quick test in C says it can match: on 30,000 characters
    # each full scan costs 0.4-1.7 ms, which an SMTP delivery pays for every message.)
    caps = len(_CAPS_WORD.findall(text)) if _CAPS_RUN.search(text) else 0
    out.add(f"b:capswords{_bucket(caps, (1, 3, 10, 30, 100))}")
    # \d matches every script's digits; only an ASCII text can be counted by translate
    digits = len(text) - len(text.translate(_NO_DIGITS)) if text.isascii() else len(text)
    if digits and "$" in text and _MONEY.search(text):
        out.add("b:money")
    if digits and "%" in text and _PERCENT.search(text):
        out.add("b:percent")
    if digits >= 10 and _PHONE.search(text):  # a phone number has ten digits
        out.add("b:phone")
    bangs = len(_BANGS.findall(text)) if "!!" in text else 0
    out.add(f"b:bangs{_bucket(bangs, (1, 3, 10))}")
    if _OPT_OUT.search(text[-3000:]):
        out.add("b:optout-tail")
    return out


def hash_features(features: Iterable[str], bits: int = BITS) -> list[int]:
    """Sorted unique bucket indices of the features."""
    mask = (1 << bits) - 1
    return sorted({zlib.crc32(f.encode("utf-8", "surrogatepass")) & mask for f in features})


# The part of the message a feature describes, by its prefix; body words have no prefix and
# headers (sender, relays, mailer, dates, authentication) are everything not named here.
_GROUPS = {"s": "subject", "u": "links", "be": "links", "b": "structure", "html": "structure",
           "tag": "structure", "ct": "structure", "cs": "structure", "cte": "structure",
           "att": "structure", "att.ext": "structure"}


def feature_group(name: str) -> str:
    head, colon, _ = name.partition(":")
    return _GROUPS.get(head, "headers") if colon else "body"


def vectorize(features: Iterable[str], bits: int = BITS) -> tuple[list[int], list[float]]:
    """Sorted unique bucket indices of the features and each one's value, normalised per part
    of the message: each part present (body words, subject, links, structure, headers) has
    the same length, 1/sqrt(parts), spread evenly over its features, so the vector has length 1.

    With one norm over all features (each 1/sqrt(n)), a long mail's body words outnumber its
    header and link features a hundred to one and drown them, and a short mail's few words
    count for little beside its headers; per part, each kind of evidence counts alike at any
    length. (Features of two parts that share a bucket add up.)"""
    mask = (1 << bits) - 1
    parts: dict[str, set[int]] = {}
    for name in features:
        group = feature_group(name)
        part = parts.get(group)
        if part is None:
            part = parts[group] = set()
        part.add(zlib.crc32(name.encode("utf-8", "surrogatepass")) & mask)
    if not parts:
        return [], []
    norm = 1.0 / math.sqrt(len(parts))
    values: dict[int, float] = {}
    for part in parts.values():
        value = norm / math.sqrt(len(part))
        for index in part:
            values[index] = values.get(index, 0.0) + value
    indices = sorted(values)
    return indices, [values[i] for i in indices]


__all__ = ["BITS", "extract", "feature_group", "hash_features", "received_features",
           "vectorize"]
