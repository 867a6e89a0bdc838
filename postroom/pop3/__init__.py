"""POP3 server (RFC 1939, with CAPA RFC 2449, STLS RFC 2595 and AUTH PLAIN RFC 5034).

`wire` formats messages for the wire, `session` runs one connection's state machine over
MailService, `locks` keeps one session per maildrop, and `server` starts the listeners.
"""
