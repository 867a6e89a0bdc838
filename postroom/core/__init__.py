"""Pure domain: models, MIME parsing, addresses and threading. No I/O, no asyncio."""
