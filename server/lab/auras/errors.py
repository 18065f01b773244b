"""What goes wrong with an aura, in the OpenAI error shape: 404 an unknown one, 400 one made on
another model, 409 one whose files or whose base model's files changed since it was written."""
from __future__ import annotations

from server.errors import InvalidRequestError, OpenAIError

__all__ = ["AuraNotFound", "AuraBaseMismatch", "AuraHashMismatch", "AuraBaseChanged", "AuraExists", "AuraCorrupt"]


class AuraNotFound(OpenAIError):
    status_code = 404
    type = "invalid_request_error"
    code = "not_found"

    def __init__(self, name: str, *, model: str | None = None, param: str | None = "name") -> None:
        if model is not None:  # named in a request's `model`: OpenAI's model_not_found
            super().__init__(f"The model `{model}` does not exist: there is no aura `{name}` (GET /lab/auras lists "
                             "them).", param="model", code="model_not_found")
        else:
            super().__init__(f"No aura `{name}` (GET /lab/auras lists them).", param=param)


class AuraBaseMismatch(InvalidRequestError):
    code = "aura_base_mismatch"


class AuraHashMismatch(OpenAIError):
    """A component file no longer hashes to what aura.json recorded: the aura is refused."""

    status_code = 409
    type = "invalid_request_error"
    code = "aura_hash_mismatch"


class AuraBaseChanged(OpenAIError):
    """The base model's files changed since the aura was made on them."""

    status_code = 409
    type = "invalid_request_error"
    code = "aura_base_changed"


class AuraExists(OpenAIError):
    status_code = 409
    type = "invalid_request_error"
    code = "aura_exists"


class AuraCorrupt(OpenAIError):
    """aura.json cannot be read or breaks the format (edited by hand, or a disk error)."""

    status_code = 409
    type = "invalid_request_error"
    code = "aura_corrupt"
