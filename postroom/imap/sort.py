"""SORT and THREAD=REFERENCES (RFC 5256) over the records' header summaries.

Strings compare with i;ascii-casemap (the RFC's default collation); addresses by the mailbox
part of their first address; dates by the Date header, or the internal date when it has none
or one that cannot be read (§3, "sent date"). Ties keep sequence number order.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from postroom.core.address import safe_getaddresses
from postroom.core.models import MessageRecord

SORT_KEYS = frozenset({"ARRIVAL", "CC", "DATE", "FROM", "SIZE", "SUBJECT", "TO",
                       "DISPLAYFROM", "DISPLAYTO"})

_BLOB = r"\[[^\[\]]*\]"
_BLOB_AT = re.compile(rf"\s*{_BLOB}")  # one subj-blob, where a match is tried
_LEADER_TAIL = re.compile(rf"\s*(?:re|fwd?)\s*(?:{_BLOB})?\s*:", re.IGNORECASE)


def base_subject(subject: str) -> str:
    """RFC 5256 §2.1: the subject without Re:, Fwd:, [list] tags and (fwd) trailers.

    Worked on as a window (start, end) over the subject, each step looking only at the
    characters it removes: a subject of thousands of tags or trailers ("[a] [a] ...",
    "x (fwd) (fwd) ...") costs its length, not its length squared (such a subject made a
    SORT hold the event loop for half a minute when each step re-read the whole rest)."""
    text = " ".join(subject.split())
    start, end = 0, len(text)
    while True:
        before = (start, end)
        end = _trailers_end(text, start, end)  # (2)
        start = _leaders_start(text, start, end)  # (3)-(5)
        # (6) "[fwd:" ... "]": unwrap and begin again at (2)
        if end - start >= 6 and text[start:start + 5].lower() == "[fwd:" \
                and text[end - 1] == "]":
            start, end = start + 5, end - 1
            while start < end and text[start].isspace():
                start += 1
            while end > start and text[end - 1].isspace():
                end -= 1
        if (start, end) == before:
            return text[start:end].upper()


def _trailers_end(text: str, start: int, end: int) -> int:
    """(2): where the subject ends once every trailing "(fwd)" (and the white space around
    each) is gone."""
    while True:
        cut = end
        while cut > start and text[cut - 1].isspace():
            cut -= 1
        if cut - start < 5 or text[cut - 5:cut].lower() != "(fwd)":
            return end
        cut -= 5
        while cut > start and text[cut - 1].isspace():
            cut -= 1
        end = cut


def _leaders_start(text: str, start: int, end: int) -> int:
    """(3)-(5): where the subject starts once its leaders ("Re:", "[list] Fwd[2]:") are gone,
    and the blobs before the rest, all but one if nothing else is left.

    A subj-leader is blobs then re/fwd: the blobs run on to the first thing that is not
    one, so a leader can only follow the whole run (where each blob starts there is a "[",
    never "re"); with none there, (4) drops blob after blob, each pass finding the same run
    end and no leader after it, so all are dropped at once but the last one if nothing
    follows it."""
    while True:
        blob_starts: list[int] = []
        pos = start
        while (blob := _BLOB_AT.match(text, pos, end)) is not None:
            blob_starts.append(pos)
            pos = blob.end()
        leader = _LEADER_TAIL.match(text, pos, end)
        if leader is not None:
            start = leader.end()
            while start < end and text[start].isspace():
                start += 1
            continue
        if not blob_starts:
            return start
        while pos < end and text[pos].isspace():
            pos += 1
        if pos < end:
            return pos
        # only blobs: keep the last one
        last = blob_starts[-1]
        while last < end and text[last].isspace():
            last += 1
        return last


def _mailbox(value: str, display: bool) -> str:
    pairs = safe_getaddresses([value]) if value else []
    if not pairs:
        return ""
    name, address = pairs[0]
    if display and name:
        return name.upper()
    return (address.rsplit("@", 1)[0] if "@" in address else address).upper()


def sent_date(record: MessageRecord) -> float:
    date = record.headers.date
    return date if date is not None else record.internal_date


def _key(name: str) -> Callable[[MessageRecord], object]:
    if name == "ARRIVAL":
        return lambda r: r.internal_date
    if name == "DATE":
        return sent_date
    if name == "SIZE":
        return lambda r: r.size
    if name == "SUBJECT":
        return lambda r: base_subject(r.headers.subject)
    if name in ("FROM", "DISPLAYFROM"):
        return lambda r: _mailbox(r.headers.from_, name == "DISPLAYFROM")
    if name in ("TO", "DISPLAYTO"):
        return lambda r: _mailbox(r.headers.to, name == "DISPLAYTO")
    return lambda r: _mailbox(r.headers.cc, False)  # CC


def sort_records(records: Sequence[MessageRecord], criteria: Sequence[tuple[str, bool]]
                 ) -> list[MessageRecord]:
    """Records (in sequence order) sorted by (key, reversed) criteria; stable otherwise."""
    out = list(records)
    for name, reverse in reversed(criteria):  # least significant first; sorts are stable
        out.sort(key=_key(name), reverse=reverse)  # type: ignore[arg-type]
    return out


# ---- THREAD=REFERENCES (§2.2, after Jamie Zawinski's algorithm) ----------------------------

@dataclass(eq=False)
class _Node:
    record: MessageRecord | None = None
    parent: _Node | None = None
    children: list[_Node] = field(default_factory=list)

    def date(self) -> float:
        if self.record is not None:
            return sent_date(self.record)
        return min((c.date() for c in self.children), default=0.0)

    def order(self) -> tuple[float, int]:
        node = self
        while node.record is None and node.children:
            node = min(node.children, key=lambda c: c.order())
        return (node.date(), node.record.uid if node.record is not None else 0)

    def has_ancestor(self, other: _Node) -> bool:
        node: _Node | None = self
        while node is not None:
            if node is other:
                return True
            node = node.parent
        return False


def _link(child: _Node, parent: _Node | None) -> None:
    if child.parent is not None:
        child.parent.children.remove(child)
    child.parent = parent
    if parent is not None:
        parent.children.append(child)


def thread_references(records: Sequence[MessageRecord]) -> list[_Node]:
    """The thread trees of the records, roots sorted by date (§2.2 steps 1-6)."""
    table: dict[str, _Node] = {}
    for record in records:
        mid = record.headers.message_id.strip()
        node = table.get(mid) if mid else None
        if node is None:
            node = _Node()
            table[mid or f"\0{record.message_id}"] = node
        elif node.record is not None:  # a duplicate Message-ID: a container of its own
            node = _Node()
            table[f"\0{record.message_id}"] = node
        node.record = record
        refs = [r.strip() for r in (*record.headers.references, record.headers.in_reply_to)
                if r.strip()]
        seen: list[str] = []
        for ref in refs:
            if ref not in seen:
                seen.append(ref)
        previous: _Node | None = None
        for ref in seen:
            ref_node = table.setdefault(ref, _Node())
            if previous is not None and ref_node.parent is None \
                    and not previous.has_ancestor(ref_node) and ref_node is not previous:
                _link(ref_node, previous)
            previous = ref_node
        if previous is not None and (previous is node or previous.has_ancestor(node)):
            previous = None
        _link(node, previous)
    roots = [n for n in dict.fromkeys(table.values()) if n.parent is None]
    roots = _prune(roots, at_root=True)
    roots = _group_by_subject(roots)
    _sort(roots)
    return roots


def _prune(nodes: list[_Node], at_root: bool) -> list[_Node]:
    out: list[_Node] = []
    for node in nodes:
        node.children = _prune(node.children, at_root=False)
        for child in node.children:
            child.parent = node
        if node.record is None:
            if not node.children:
                continue
            if not at_root or len(node.children) == 1:
                out.extend(node.children)
                continue
        out.append(node)
    return out


def _group_by_subject(roots: list[_Node]) -> list[_Node]:
    """§2.2 step 5: threads whose roots share a base subject become one."""
    subjects: dict[str, _Node] = {}

    def subject_of(node: _Node) -> tuple[str, bool]:
        record = node.record if node.record is not None else node.children[0].record
        if record is None:
            return "", False
        text = record.headers.subject
        return base_subject(text), base_subject(text) != " ".join(text.split()).upper()

    for root in roots:
        subject, _ = subject_of(root)
        if not subject:
            continue
        held = subjects.get(subject)
        if held is None or (held.record is not None and root.record is None) or (
                held.record is not None and root.record is not None
                and subject_of(held)[1] and not subject_of(root)[1]):
            subjects[subject] = root
    out: list[_Node] = []
    for root in roots:
        subject, is_reply = subject_of(root)
        held = subjects.get(subject) if subject else None
        if held is None or held is root:
            out.append(root)
            continue
        if held.record is None and root.record is None:
            for child in list(root.children):
                _link(child, held)
        elif held.record is None:
            _link(root, held)
        elif root.record is None:  # cannot happen: dummies win the table
            out.append(root)
        elif is_reply and not subject_of(held)[1]:
            _link(root, held)
        else:
            dummy = _Node()
            index = out.index(held) if held in out else -1
            held.parent = None
            _link(held, dummy)
            _link(root, dummy)
            subjects[subject] = dummy
            if index >= 0:
                out[index] = dummy
            else:
                roots[roots.index(held)] = dummy
    return out


def _sort(nodes: list[_Node]) -> None:
    nodes.sort(key=lambda n: n.order())
    for node in nodes:
        _sort(node.children)


def thread_text(roots: Sequence[_Node], number: Callable[[MessageRecord], int]) -> bytes:
    """`(1 2 (3)(4 5))...`: each thread, a single child continuing its parent's list."""

    def body(node: _Node) -> str:
        parts: list[str] = []
        while True:
            if node.record is not None:
                parts.append(str(number(node.record)))
            if len(node.children) == 1 and node.record is not None:
                node = node.children[0]
                continue
            break
        branches = "".join(f"({body(c)})" for c in node.children)
        return " ".join([*parts, branches] if branches else parts)

    return "".join(f"({body(r)})" for r in roots).encode()
