"""Postroom: a complete email service."""

__version__ = "0.1.0"
