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
from dataclasses import dataclass, field

from postroom.core.models import Folder, MessageRecord
from postroom.imap.parser import SequenceSet, resolve
from postroom.imap.response import flag_list

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
            for uid in sorted(self.gone, reverse=True):
                msn = self.msn_of(uid)
                if msn is None:
                    continue
                out.append(b"* %d EXPUNGE" % msn)
                del self.uids[msn - 1]
                self.records.pop(uid, None)
                self.recent.discard(uid)
            self.gone.clear()
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

    def flags_response(self, uid: int, condstore: bool, with_uid: bool) -> bytes:
        record = self.records[uid]
        msn = self.msn_of(uid)
        items = [b"FLAGS " + flag_list(record.flags, uid in self.recent)]
        if with_uid:
            items.insert(0, b"UID %d" % uid)
        if condstore:
            items.append(b"MODSEQ (%d)" % record.modseq)
        return b"* %d FETCH (" % (msn or 0) + b" ".join(items) + b")"
