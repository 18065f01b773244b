"""What can go wrong inside an engine, with no HTTP in sight.

An engine knows what failed (a token id outside the vocabulary, a schema it cannot compile, a
prompt longer than its context) but not which wire field the value came from: the same schema
may be a chat `response_format`, a forced tool's parameters or the Responses API's `text.format`.
So an engine error carries a `hint` — the engine's own name for the input at fault, one of the
HINT_* constants — and the server maps the error class to a status and the hint to a `param`
(server/errors.py), with the caller saying what each hint is called on its surface."""
from __future__ import annotations

__all__ = [
    "EngineError", "InvalidInput", "ContextTooLong", "Unsupported", "LoadFailed", "BackendUnreachable",
    "BackendTimedOut", "RemoteRejected", "RunnerFailed",
    "HINT_MODEL", "HINT_PROMPT", "HINT_TOKENS", "HINT_LOGIT_BIAS", "HINT_SCHEMA", "HINT_SUFFIX", "HINT_LORA",
    "HINT_INPUT", "HINT_ECHO", "HINT_TOOLS", "HINT_LOGPROBS",
]

# The engine's names for what a request gave it (a surface maps them to its own field names).
HINT_MODEL = "model"  # the model itself cannot do this
HINT_PROMPT = "prompt"  # the conversation or prompt text (chat messages, a completion prompt)
HINT_TOKENS = "tokens"  # token ids given directly
HINT_LOGIT_BIAS = "logit_bias"
HINT_SCHEMA = "json_schema"  # a JSON schema the output must match
HINT_SUFFIX = "suffix"  # fill-in-the-middle text after the gap
HINT_LORA = "lora"
HINT_INPUT = "input"  # texts to embed
HINT_ECHO = "echo"  # scoring the prompt's own tokens
HINT_TOOLS = "tools"  # the tool definitions themselves
HINT_LOGPROBS = "logprobs"


class EngineError(Exception):
    """An engine failure: a message for the user and, where an input is at fault, a hint naming it."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class InvalidInput(EngineError):
    """The request gave the engine something it cannot use (the caller's fault)."""


class ContextTooLong(InvalidInput):
    """The prompt (plus the tokens asked for) does not fit the model's context: refused, never truncated."""


class Unsupported(EngineError):
    """The model cannot do what was asked (no chat template, no infill tokens, no embeddings...)."""


class LoadFailed(EngineError):
    """The model could not be loaded (missing or corrupt files, a missing package, a bad parameter)."""


class BackendUnreachable(EngineError):
    """The model lives behind another server or process that could not be reached or failed."""


class BackendTimedOut(EngineError):
    """The model's remote server or runner process did not answer in its configured time."""


class RemoteRejected(EngineError):
    """A remote server refused the request: its own status and error fields, passed on as they came."""

    def __init__(self, status: int, message: str, *, type_: str | None = None, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.param = param
        self.code = code


class RunnerFailed(EngineError):
    """User code (a victor_custom runner.py) raised, crashed or ran out of memory; `code` says which."""

    def __init__(self, message: str, *, code: str = "runner_error") -> None:
        super().__init__(message)
        self.code = code
