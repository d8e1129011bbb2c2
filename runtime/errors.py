"""The toolkit's error hierarchy.

Lives in `runtime/` (the torch-free ground floor) so that every package can raise and catch the same
classes. Every message names the file or tensor, what was found against what was expected, and, where
there is one, the fix. CLIs catch `ToolkitError` and print its message instead of a traceback.
"""

from __future__ import annotations


class ToolkitError(Exception):
    """Base class: an error the user can act on (bad input, bad files, failed check)."""


class CheckpointError(ToolkitError):
    """A checkpoint file is missing, unreadable, truncated, or does not match the model it should load."""


class InputError(ToolkitError):
    """User input is unusable: unreadable or silent audio, empty text, an invalid emotion vector..."""


class ContractError(ToolkitError):
    """A graph's inputs or outputs do not match its declared contract (names, dtypes, ranks, axes)."""


class ParityError(ToolkitError):
    """Two implementations that must agree (eager vs original, graph vs eager) do not."""


class EngineMismatchError(ToolkitError):
    """An engine artifact was built for another graph, precision, TensorRT version or GPU."""


class BackendError(ToolkitError):
    """A backend cannot run here or failed while running: unknown name, missing package or GPU,
    an execution provider that did not activate, a runtime failure inside the backend."""


class EmotionAnswerError(ToolkitError):
    """The emotion model's answer to an emotion text was unusable (a score that is not a number).

    Its own class because the remedy differs from bad input: the same request may succeed when retried
    (the model may answer differently), or the caller can pass the emotion as a vector. `retryable` tells
    a server to answer with a retryable status; `answer` is the model's raw answer."""

    retryable = True

    def __init__(self, message: str, answer: str = "") -> None:
        super().__init__(message)
        self.answer = answer


class StreamError(ToolkitError):
    """A stream failed after it started: the message and `chunks` say how much audio the caller already
    has, `segment` where it failed (0-based), and the cause is chained (`__cause__`). `retryable` follows
    the cause's (an emotion answer may succeed again; a broken engine will not)."""

    def __init__(self, message: str, chunks: int = 0, segment: int = 0, retryable: bool = False) -> None:
        super().__init__(message)
        self.chunks = chunks
        self.segment = segment
        self.retryable = retryable


class QueueFull(ToolkitError):
    """The synthesizer is at its bound of requests in flight and waiting (runtime/scheduler/admission.py):
    nothing of the request was started. Retryable: the same request succeeds once others finish."""

    retryable = True


class Cancelled(ToolkitError):
    """The request was cancelled (its stream closed, e.g. a client that went away) before this stage ran;
    its rows in the shared batches were freed."""
