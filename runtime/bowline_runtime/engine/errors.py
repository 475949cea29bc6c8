"""The one error type for "the client asked for something this server cannot do".

It lives at engine level so the engine (in this process or another) and the API raise and
recognise the same class. The API maps exactly this (and pydantic's validation errors) to HTTP
400; any other exception is a bug or an outage and becomes a 500, so an internal failure never
looks like the client's fault.
"""

from __future__ import annotations


class RequestRejected(ValueError):
    """A client mistake, with the request field to blame (OpenAI's `param`) when there is one.

    A ValueError subclass so callers that already catch ValueError (the CLI, older tests) keep
    working; the API distinguishes it by type.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def __reduce__(self) -> tuple[type[RequestRejected], tuple[str, str | None]]:
        # Survives pickling across a process boundary with its `param` intact.
        return (type(self), (self.message, self.param))
