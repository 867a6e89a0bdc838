"""HTTP front end: the REST API v1 (and later the WebSocket push and the webmail)."""
