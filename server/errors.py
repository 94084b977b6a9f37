"""Every exception type of the server, in one place: what each means, and who raises and catches it.

Expected failures carry a message that says what to do; `UserError`s are shown to the person without a
traceback (Chinese, then English), `ApiError`s become one JSON error answer per API family.
"""

from __future__ import annotations


# -- For people ----------------------------------------------------------------------------------------------------
class UserError(Exception):
    """An expected failure: its message (Chinese, then English) is shown to the person without a traceback."""


class BrokenIndex(UserError):
    """The weight index is not what the hub serves; the message says which file and what to do."""


class DownloadError(UserError):
    """A download failed in a way the user must act on; the message says how (Chinese, then English)."""


# -- The model -----------------------------------------------------------------------------------------------------
class TransientError(Exception):
    """A failure worth retrying (network, server busy)."""


class ConversionError(Exception):
    """The checkpoint cannot be converted; the message says why and what to do."""


class ModelLoadError(Exception):
    """The model could not be loaded; the message says why and what to do."""


# -- Generation ----------------------------------------------------------------------------------------------------
class ContextOverflow(Exception):
    """The query (with the answer prefix) does not fit the context even without history."""

    def __init__(self, prompt_tokens: int, limit: int, max_context: int):
        self.prompt_tokens, self.limit, self.max_context = prompt_tokens, limit, max_context
        super().__init__(
            f"the query needs {prompt_tokens} tokens but at most {limit} fit (context budget {max_context} "
            f"tokens, with room left for the reply); shorten the query or the answer prefix")


class EngineBusy(Exception):
    """The queue is full."""


class NotReady(Exception):
    """The model is not loaded (yet, or loading failed)."""


# -- The front end's upstream engines ------------------------------------------------------------------------------
class UpstreamError(Exception):
    """A call to an upstream failed. `status` is its HTTP status (None: no answer at all)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status

    @property
    def unreachable(self) -> bool:
        """No answer, or a server-side failure: another upstream may do better."""
        return self.status is None or self.status >= 500 or self.status == 429


class UpstreamRejected(Exception):
    """An upstream refused the request itself (a 4xx other than 429): another upstream would refuse it too."""


# -- HTTP ----------------------------------------------------------------------------------------------------------
class ApiError(Exception):
    """A request the server refuses: an HTTP status, a message that says what to do, and extra fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}
        self.extra = extra
