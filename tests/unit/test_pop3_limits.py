"""POP3 connection limits: in all and per client address, released when a session ends."""

from __future__ import annotations

from postroom.pop3.limits import ConnectionLimits, limits_for


def test_per_address_and_total_limits() -> None:
    limits = ConnectionLimits(total=3, per_address=2)
    assert limits.admit("192.0.2.1") == "" and limits.admit("192.0.2.1") == ""
    assert "your address" in limits.admit("192.0.2.1")
    assert limits.admit("192.0.2.2") == ""
    assert "too many connections" in limits.admit("192.0.2.3")  # the total is reached
    limits.release("192.0.2.1")
    assert limits.admit("192.0.2.3") == ""
    for address in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
        limits.release(address)
    assert limits.open == 0 and limits.admit("192.0.2.1") == ""


class Node:
    pass


def test_listeners_of_one_node_share_the_counts() -> None:
    node, other = Node(), Node()
    assert limits_for(node, 5, 1) is limits_for(node, 5, 1)
    assert limits_for(node, 5, 1) is not limits_for(other, 5, 1)
