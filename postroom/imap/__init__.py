"""The IMAP4rev1 server (RFC 3501) with the extensions modern clients use.

One module per job: `parser` (the streaming command reader and the grammar), `response`
(formatting: strings, literals, mailbox names), `mime` (BODYSTRUCTURE, ENVELOPE and sections
from the stored raw bytes), `search` (SEARCH keys and their evaluation), `mailbox` (the selected
folder's per-session sequence number map and its untagged updates), `hub` (event bus fan-out to
sessions), `session` (the commands), `server` (the listeners).
"""
