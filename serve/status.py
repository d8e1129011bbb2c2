"""One failure -> the status both doors report (HTTP status; the Triton models' `status` output) and its
message. The request fails alone; the server keeps serving."""

from __future__ import annotations

import logging

from runtime.errors import InputError, QueueFull, ToolkitError
from serve.errors import NotFound, TooBusy, TooLarge

log = logging.getLogger(__name__)


def status_of(err: BaseException) -> tuple[int, str]:
    if isinstance(err, TooLarge):
        return 413, str(err)
    if isinstance(err, (NotFound, InputError)):
        return 400, str(err)
    if isinstance(err, (TooBusy, QueueFull)):
        return 429, str(err)
    if getattr(err, "retryable", False):
        return 503, str(err)
    if isinstance(err, ToolkitError):
        return 500, str(err)
    log.error("request failed", exc_info=err)
    return 500, f"internal error ({type(err).__name__}); see the server log"
