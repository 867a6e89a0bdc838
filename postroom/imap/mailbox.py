"""The selected folder as one session sees it: message sequence numbers and pending updates.

Sequence numbers belong to the session (RFC 3501 §2.3.1.2): they change only when this session
is told of an expunge. A message removed by someone else stays in the map (a "ghost" whose
flags and bytes can still be fetched) until a command that may report EXPUNGE runs; new
messages are appended at the end and announced with EXISTS; flag changes made elsewhere are
announced as FETCH FLAGS. `sync` computes those untagged responses from a fresh read of the
folder, so it is idempotent: the session's own changes, already applied, produce nothing twice.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass, field, replace

from postroom.core.models import Folder, MessageRecord
from postroom.imap.parser import SequenceSet, resolve
from postroom.imap.response import flag_list
from postroom.store.events import MESSAGE_DELETED, MESSAGE_FLAGS, MESSAGE_MOVED, MESSAGE_NEW, Event

log = logging.getLogger(__name__)


@dataclass
class Selected:
    folder: Folder
    readonly: bool
    uids: list[int] = field(default_factory=list)  # msn - 1 -> uid, ascending
    records: dict[int, MessageRecord] = field(default_factory=dict)
    recent: set[int] = field(default_factory=set)
    gone: set[int] = field(default_factory=set)  # expunged elsewhere, not yet reported
    highestmodseq: int = 0
    dirty: bool = False
    full_resync: bool = False  # events were missed: re-read the folder
    pending: list[Event] = field(default_factory=list)  # events not yet applied
    qresync: bool = False  # removals are reported as VANISHED, not EXPUNGE (RFC 7162 §3.2.10)

    @property
    def exists(self) -> int:
        return len(self.uids)

    @property
    def max_uid(self) -> int:
        return self.uids[-1] if self.uids else 0

    def msn_of(self, uid: int) -> int | None:
        i = bisect.bisect_left(self.uids, uid)
        return i + 1 if i < len(self.uids) and self.uids[i] == uid else None

    def load(self, folder: Folder, records: list[MessageRecord], recent: set[int]) -> None:
        self.folder = folder
        self.uids = [r.uid for r in records]
        self.records = {r.uid: r for r in records}
        self.recent = recent
        self.gone = set()
        self.highestmodseq = folder.highestmodseq

    def by_msn(self, seq: SequenceSet) -> list[int]:
        """The uids a message-sequence set names, ascending (ValueError if out of range)."""
        if not self.uids:
            raise ValueError("the mailbox is empty")
        out: set[int] = set()
        for lo, hi in resolve(seq, len(self.uids)):
            if hi > len(self.uids):
                raise ValueError(f"message sequence number {hi} does not exist; "
                                 f"the mailbox has {len(self.uids)} messages")
            out.update(self.uids[lo - 1 : hi])
        return sorted(out)

    def by_uid(self, seq: SequenceSet) -> list[int]:
        """The existing uids a UID set names, ascending (non-existent ones are ignored)."""
        if not self.uids:
            return []
        out: list[int] = []
        for lo, hi in resolve(seq, self.max_uid):
            a = bisect.bisect_left(self.uids, lo)
            b = bisect.bisect_right(self.uids, hi)
            out.extend(self.uids[a:b])
        return sorted(set(out))

    def sync(
        self,
        folder: Folder,
        records: list[MessageRecord],
        *,
        allow_expunge: bool,
        claim: set[int],
        condstore: bool,
        announce_flags: bool = True,
    ) -> list[bytes]:
        """Untagged responses that bring the session up to `records` (a fresh read)."""
        out: list[bytes] = []
        current = {r.uid: r for r in records}
        for uid in self.uids:
            if uid not in current:
                self.gone.add(uid)
        if allow_expunge and self.gone:
            out.extend(self.report_gone())
        top = self.max_uid
        new = [r for r in records if r.uid > top]
        stray = [r.uid for r in records if r.uid < top and r.uid not in self.records]
        if stray:  # only possible when another engine commits uids out of order
            log.warning("uids %s appeared below uid %d in %s; they are shown after a reselect",
                        stray[:5], top, folder.folder_id)
        if new:
            for r in new:
                self.uids.append(r.uid)
                self.records[r.uid] = r
            self.recent |= claim & {r.uid for r in new}
            out.append(b"* %d EXISTS" % len(self.uids))
            out.append(b"* %d RECENT" % len(self.recent))
        new_uids = {r.uid for r in new}
        for uid, record in current.items():
            old = self.records.get(uid)
            if old is None or uid in new_uids or uid in self.gone:
                continue
            if old.flags != record.flags or old.modseq != record.modseq:
                self.records[uid] = record
                if announce_flags and (old.flags != record.flags or condstore):
                    out.append(self.flags_response(uid, condstore, with_uid=True))
        self.folder = folder
        self.highestmodseq = max(self.highestmodseq, folder.highestmodseq)
        self.dirty = False
        return out

    def already_known(self, event: Event) -> bool:
        """True when the event reports what this session already shows (its own change)."""
        here = self.folder.folder_id
        if event.type == MESSAGE_FLAGS and event.folder_id == here:
            record = self.records.get(event.uid)
            return record is not None and record.modseq >= event.modseq
        if event.type in (MESSAGE_NEW, MESSAGE_MOVED) and event.folder_id == here:
            return event.uid <= self.max_uid and (event.type == MESSAGE_NEW
                                                  or event.data.get("from_folder_id") != here)
        if event.type == MESSAGE_MOVED and event.data.get("from_folder_id") == here:
            uid = event.data.get("from_uid")
            return isinstance(uid, int) and (self.msn_of(uid) is None or uid in self.gone)
        if event.type == MESSAGE_DELETED and event.folder_id == here:
            return self.msn_of(event.uid) is None or event.uid in self.gone
        return False

    def add_own(self, record: MessageRecord, recent: bool) -> list[bytes]:
        """A message this session filed itself; announced at once when no uid was skipped."""
        if record.uid != self.folder.uidnext or record.uid <= self.max_uid:
            self.dirty = True
            return []
        self.uids.append(record.uid)
        self.records[record.uid] = record
        if recent:
            self.recent.add(record.uid)
        self.folder = replace(self.folder, uidnext=record.uid + 1)
        self.highestmodseq = max(self.highestmodseq, record.modseq)
        return [b"* %d EXISTS" % len(self.uids), b"* %d RECENT" % len(self.recent)]

    def append_new(self, record: MessageRecord, recent: bool) -> list[bytes]:
        """A message filed elsewhere above every uid the session knows: EXISTS and RECENT."""
        self.uids.append(record.uid)
        self.records[record.uid] = record
        if recent:
            self.recent.add(record.uid)
        self.folder = replace(self.folder, uidnext=max(self.folder.uidnext, record.uid + 1))
        self.highestmodseq = max(self.highestmodseq, record.modseq)
        return [b"* %d EXISTS" % len(self.uids), b"* %d RECENT" % len(self.recent)]

    def own_modseqs(self, modseqs: list[int]) -> None:
        """This session's own change took the folder to these modseqs. When it follows
        straight on from what the session has seen (no gap another writer could have
        filled), the session is up to date at it: a NOOP then need not re-read the folder."""
        for modseq in sorted(set(modseqs)):
            if modseq == self.highestmodseq + 1:
                self.highestmodseq = modseq

    def report_gone(self) -> list[bytes]:
        """EXPUNGE responses for the removed messages not yet reported, highest first (one
        VANISHED response with QRESYNC)."""
        out: list[bytes] = []
        if self.qresync:
            known = sorted(u for u in self.gone if self.msn_of(u) is not None)
            for uid in reversed(known):
                msn = self.msn_of(uid)
                assert msn is not None
                del self.uids[msn - 1]
                self.records.pop(uid, None)
                self.recent.discard(uid)
            self.gone.clear()
            return [b"* VANISHED " + uid_set(known).encode()] if known else []
        for uid in sorted(self.gone, reverse=True):
            msn = self.msn_of(uid)
            if msn is None:
                continue
            out.append(b"* %d EXPUNGE" % msn)
            del self.uids[msn - 1]
            self.records.pop(uid, None)
            self.recent.discard(uid)
        self.gone.clear()
        return out

    def flags_response(self, uid: int, condstore: bool, with_uid: bool) -> bytes:
        record = self.records[uid]
        msn = self.msn_of(uid)
        items = [b"FLAGS " + flag_list(record.flags, uid in self.recent)]
        if with_uid:
            items.insert(0, b"UID %d" % uid)
        if condstore:
            items.append(b"MODSEQ (%d)" % record.modseq)
        return b"* %d FETCH (" % (msn or 0) + b" ".join(items) + b")"


def uid_set(numbers: list[int]) -> str:
    """A compact set of ascending numbers: 1:3,7,9:10."""
    out: list[str] = []
    start = prev = -1
    for n in numbers:
        if n == prev + 1:
            prev = n
            continue
        if start >= 0:
            out.append(f"{start}:{prev}" if start != prev else str(start))
        start = prev = n
    if start >= 0:
        out.append(f"{start}:{prev}" if start != prev else str(start))
    return ",".join(out)
