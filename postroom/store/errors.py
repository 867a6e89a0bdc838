"""Errors every storage implementation raises, so callers never see engine exceptions."""

from __future__ import annotations


class StoreError(Exception):
    """Base class for storage errors."""


class NotFound(StoreError):
    """The row does not exist, or does not belong to the user named."""


class Conflict(StoreError):
    """A unique name is already taken, or the change would break an invariant."""
