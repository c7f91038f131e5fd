"""The one error hierarchy every entry point raises.

The library raises these; the server maps ``http_status`` to the response and renders
``{"error": {"type", "message", "param"}}``; the batch job writes ``type: message`` into the
row's ``error`` field; every command prints ``error: type: message`` and exits with
:data:`EXIT_ERROR`. Messages say what was expected and what was received, and never contain stack
traces or internal paths.

Exit codes, the same for every entry point (``tokenizers-svc`` and its commands, ``python -m
serving.batch``, ``python -m training.train``, ``python -m evals.reconstruct``):
:data:`EXIT_OK` on success; :data:`EXIT_ERROR` when a typed error stopped the command (bad input,
bad configuration or recipe, unknown model) or some of its inputs failed; :data:`EXIT_USAGE` when
the command line itself is wrong (argparse/typer) or the part it names is not installed.
"""

from __future__ import annotations

import sys

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


class TokenizerError(Exception):
    """Base class. ``type`` is the stable machine-readable name, ``param`` the offending input."""

    type: str = "tokenizer_error"
    http_status: int = 400

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def to_dict(self) -> dict:
        return {"type": self.type, "message": self.message, "param": self.param}


class InvalidMediaError(TokenizerError):
    """Bytes that are not a decodable image/video (truncated, garbage, unsupported container)."""

    type = "invalid_media"
    http_status = 422


class UnsupportedMediaTypeError(TokenizerError):
    """A content type or file extension this service does not read or write."""

    type = "unsupported_media_type"
    http_status = 415


class UnsupportedModelError(TokenizerError):
    """Unknown model name, unreadable model directory, or a family we have no adapter for."""

    type = "unsupported_model"
    http_status = 404


class ShapeMismatchError(TokenizerError):
    """A tensor whose layout, rank, channels or size does not fit the tokenizer."""

    type = "shape_mismatch"
    http_status = 422


class DTypeMismatchError(TokenizerError):
    """A tensor whose dtype the tokenizer does not accept."""

    type = "dtype_mismatch"
    http_status = 422


class InvalidLatentsError(TokenizerError):
    """A latent file/tensor that fails validation (metadata, NaN/Inf, wrong tokenizer)."""

    type = "invalid_latents"
    http_status = 422


class InvalidRequestError(TokenizerError):
    """A request option or configuration value that is not allowed."""

    type = "invalid_request"
    http_status = 422


class LimitExceededError(TokenizerError):
    """Input larger than a configured cap (bytes, pixels, frames, duration, latent size)."""

    type = "limit_exceeded"
    http_status = 413


class AuthenticationError(TokenizerError):
    type = "authentication_error"
    http_status = 401


class OverloadedError(TokenizerError):
    """The bounded queue is full; retry after ``retry_after`` seconds."""

    type = "overloaded"
    http_status = 503

    def __init__(self, message: str, *, param: str | None = None, retry_after: float = 1.0) -> None:
        super().__init__(message, param=param)
        self.retry_after = retry_after


class BodyTimeoutError(TokenizerError):
    """The request body did not arrive within the server's ``body_timeout_s`` (a stalled upload)."""

    type = "body_timeout"
    http_status = 408


class RequestTimeoutError(TokenizerError):
    type = "timeout"
    http_status = 504


class ModelError(TokenizerError):
    """The model raised something other than a TokenizerError on an input (e.g. a normalization
    layer given too few pixels): that input fails with the exception's kind and message, and the
    items beside it, the rest of the batch job and the server go on."""

    type = "model_error"
    http_status = 500

    @classmethod
    def from_exception(cls, exc: Exception) -> ModelError:
        return cls(f"the model failed on this input: {type(exc).__name__}: {exc}", param="file")


class ConfigError(TokenizerError):
    """A recipe or service config with a wrong key or type; raised at start, before any work."""

    type = "config_error"
    http_status = 400


class InternalError(TokenizerError):
    """What the client sees of an unexpected exception: no type name, message or path from inside."""

    type = "internal_error"
    http_status = 500


HTTP_ERROR_TYPES = {404: "not_found", 405: "method_not_allowed"}


class HTTPError(TokenizerError):
    """A refusal of the HTTP layer itself, before any route runs: an unknown path (404), a method
    the route does not take (405); ``type`` names the status (:data:`HTTP_ERROR_TYPES`)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.http_status = status
        self.type = HTTP_ERROR_TYPES.get(status, "http_error")


def error_from_dict(
    data: dict, *, status: int | None = None, retry_after: float | None = None
) -> TokenizerError:
    """``{"type", "message", "param"}`` (:meth:`TokenizerError.to_dict`, the error JSON) -> the
    error of that type, so that an error crosses a process or the network as a value and is raised
    again on the other side. A type this version does not know becomes the base class with that
    type and ``status``."""
    kind, message, param = data.get("type"), data.get("message", ""), data.get("param")
    statuses = {name: code for code, name in HTTP_ERROR_TYPES.items()}
    if kind in statuses:
        return HTTPError(statuses[kind], message)
    if kind == OverloadedError.type:
        return OverloadedError(message, param=param, retry_after=1.0 if retry_after is None else retry_after)
    classes, stack = {}, [TokenizerError]
    while stack:
        cls = stack.pop()
        classes.setdefault(cls.type, cls)
        stack.extend(cls.__subclasses__())
    error = classes.get(kind, TokenizerError)(message, param=param)
    if kind not in classes:
        error.type = kind or TokenizerError.type
        error.http_status = status or TokenizerError.http_status
    return error


def print_error(error: TokenizerError) -> int:
    """Print ``error: type: message`` to stderr; returns :data:`EXIT_ERROR` for the caller to exit with."""
    print(f"error: {error.type}: {error.message}", file=sys.stderr)
    return EXIT_ERROR
