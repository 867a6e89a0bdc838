"""How many POP3 sessions a node serves at once: in all, and per client address.

A client that opens session after session (a misconfigured poller, a password sprayer) should
not take every slot. Over a limit the greeting is `-ERR [SYS/TEMP]` (RFC 3206: a temporary
trouble of the server, try later), and the connection is closed. The counts are this node's:
each node of a scale-out cluster limits its own share.
"""

from __future__ import annotations

import weakref


class ConnectionLimits:
    def __init__(self, total: int, per_address: int) -> None:
        self.total = total
        self.per_address = per_address
        self.open = 0
        self._by_address: dict[str, int] = {}

    def admit(self, address: str) -> str:
        """Take a slot for a session from `address`; empty if admitted, else the reason."""
        if self.open >= self.total:
            return "too many connections, try again later"
        if self._by_address.get(address, 0) >= self.per_address:
            return "too many connections from your address, try again later"
        self.open += 1
        self._by_address[address] = self._by_address.get(address, 0) + 1
        return ""

    def release(self, address: str) -> None:
        self.open -= 1
        left = self._by_address.get(address, 0) - 1
        if left > 0:
            self._by_address[address] = left
        else:
            self._by_address.pop(address, None)


_BY_NODE: weakref.WeakKeyDictionary[object, ConnectionLimits] = weakref.WeakKeyDictionary()


def limits_for(node_service: object, total: int, per_address: int) -> ConnectionLimits:
    """The limits shared by every POP3 listener over one MailService (pop3 and pop3s)."""
    limits = _BY_NODE.get(node_service)
    if limits is None:
        limits = _BY_NODE[node_service] = ConnectionLimits(total, per_address)
    return limits
