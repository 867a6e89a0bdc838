"""Mail flow: incoming processing and (later) outgoing delivery, fed by the queues."""
