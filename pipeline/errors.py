"""The error tree. Its shape decides what the engine does with a failure.

    PipelineError
    ├── ConfigError       a mistake in the config or command line: exit 2, no work done
    ├── FatalError        the run cannot go on (store unreachable or in use,
    │   │                 credentials rejected): stop at once, exit 3
    │   └── InUseError    another process holds it (an embedded store, the state)
    └── StageError        one item failed inside a stage
        ├── TransientError  worth retrying: timeout, dropped connection, 429, 5xx
        │                   (flags: `overloaded` cuts the adaptive limit, `unavailable`
        │                   opens the circuit breaker instead of using up attempts)
        └── PermanentError  never retried: corrupt PDF, HTTP 400; the document fails
                            (flag: `config_suspect`, the same refusal for every
                            document means the config is wrong: the run stops)

Stages translate library errors into these at their edge (`raise TransientError(...)
from exc`); the engine looks at types only. Any other exception escaping a stage is
a bug in that stage: its document fails with the traceback recorded, the run goes on.
"""

from __future__ import annotations

import signal

__all__ = [
    "ConfigError",
    "FatalError",
    "InUseError",
    "PermanentError",
    "PipelineError",
    "StageError",
    "TransientError",
    "exit_reason",
]


class PipelineError(Exception):
    """Base of every error the engine expects and knows how to report."""


class ConfigError(PipelineError):
    """A user mistake in the config: names the file, line, key and expectation.

    Rendered as `pipeline.yaml:14: stages[2].pool.size: expected a positive
    integer or "auto", got "many"`; the CLI prints it and exits 2.
    """

    def __init__(
        self,
        file: str,
        key: str,
        expected: str,
        *,
        line: int | None = None,
        got: object = None,
        show_got: bool = True,
    ) -> None:
        self.file = file
        self.line = line
        self.key = key
        self.expected = expected
        where = f"{file}:{line}" if line is not None else file
        text = f"{where}: {key}: expected {expected}" if key else f"{where}: expected {expected}"
        if show_got:
            text += f", got {_show(got)}"
        super().__init__(text)


class FatalError(PipelineError):
    """The run cannot go on; retrying any document would fail the same way."""


class InUseError(FatalError):
    """Another process holds what we need (an embedded store allows one): worth
    waiting for when the holder is a watcher between passes, never otherwise."""


class StageError(PipelineError):
    """One item failed in a stage.

    `reason` is a short, bounded label for metrics and summaries ("http_429",
    "timeout", "no_text"); the message is for people.
    """

    reason: str = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason if reason is not None else type(self).reason
        self.stage: str | None = None  # set when raised by a stage fused into another

    def __reduce__(self) -> tuple[object, ...]:
        # Errors cross process boundaries (pool workers); the default pickling
        # would call cls(message) and lose the keyword-only attributes.
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


class TransientError(StageError):
    """Worth retrying: timeout, dropped connection, 408, 429, 5xx, garbled reply."""

    reason = "transient"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        retry_after: float | None = None,
        cool_pool: bool = False,
        overloaded: bool = False,
        unavailable: bool = False,
    ) -> None:
        super().__init__(message, reason=reason)
        self.retry_after = retry_after  # seconds, from the server's Retry-After
        self.cool_pool = cool_pool  # a 429: the whole pool should wait, not one worker
        # The server is saturated (timeout, 429, 503): fewer calls in flight, now.
        self.overloaded = overloaded
        # The server is not there (refused, reset, 502/503/504): wait on the breaker.
        self.unavailable = unavailable


class PermanentError(StageError):
    """Corrupt input, HTTP 400: the document fails, never retried.

    When a batch of several items fails with this, the engine splits the batch to
    find the item at fault, so only that item's document fails.
    """

    reason = "permanent"

    def __init__(
        self, message: str, *, reason: str | None = None, config_suspect: bool = False
    ) -> None:
        super().__init__(message, reason=reason)
        # A refusal that may come from a setting, not the item (an HTTP 400 or 422):
        # if the first documents all fail alike, the run stops (pipeline.systemic).
        self.config_suspect = config_suspect


def exit_reason(code: int | None) -> str:
    """How a child process ended, for the error that its death causes: the signal's
    name (a negative exit status), or its exit code."""
    if code is not None and code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _rebuild(
    cls: type[StageError], args: tuple[object, ...], state: dict[str, object]
) -> StageError:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


def _show(value: object) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if value is None:
        return "nothing"
    return repr(value)
