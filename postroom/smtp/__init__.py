"""SMTP servers: the inbound MX listener and the submission listeners (STARTTLS and implicit TLS).

A thin protocol layer of our own on asyncio streams (see docs/ARCHITECTURE.md, "SMTP server"):
`commands` parses command lines and their parameters, `data` frames DATA and BDAT payloads and
refuses bare newlines, `trace` writes Return-Path and Received, `session` runs one connection's
state machine, and `server` starts the listeners. Every decision about mail is MailService's.
"""
