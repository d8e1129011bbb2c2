"""Errors a front door turns into a status: each names the problem (and the limit, when one was hit)."""

from __future__ import annotations

from runtime.errors import InputError, ToolkitError


class TooLarge(InputError):
    """An upload or field beyond a limit (HTTP 413)."""


class NotFound(InputError):
    """An unknown voice id (HTTP 404 where the id is the resource, 400 inside a speech request)."""


class TooBusy(ToolkitError):
    """The process already holds its maximum of requests (HTTP 429, Retry-After)."""

    retryable = True
