"""Storage seams (one Protocol per module) and their implementations, chosen by URL."""
