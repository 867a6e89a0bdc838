"""One POP3 session per maildrop (RFC 1939 §8: the server acquires an exclusive-access lock).

The lock lives in this process, which is enough for the embedded single node: every listener of
the node shares one `MaildropLocks`. Across nodes two sessions may both hold a maildrop; that is
safe (a DELE only removes what is still in the folder it was read from) and documented in
docs/SCALING.md §3, with the shared lock it would take (SET NX PX on the cache's Redis).
"""

from __future__ import annotations

import weakref


class MaildropLocks:
    def __init__(self) -> None:
        self._owners: dict[str, object] = {}

    def acquire(self, user_id: str, owner: object) -> bool:
        """Take the user's maildrop for `owner`; False when another session holds it."""
        held = self._owners.setdefault(user_id, owner)
        return held is owner

    def release(self, user_id: str, owner: object) -> None:
        if self._owners.get(user_id) is owner:
            del self._owners[user_id]

    def held(self, user_id: str) -> bool:
        return user_id in self._owners


_BY_NODE: weakref.WeakKeyDictionary[object, MaildropLocks] = weakref.WeakKeyDictionary()


def locks_for(node_service: object) -> MaildropLocks:
    """The locks shared by every POP3 listener over one MailService (pop3 and pop3s)."""
    locks = _BY_NODE.get(node_service)
    if locks is None:
        locks = _BY_NODE[node_service] = MaildropLocks()
    return locks
