"""keep_alive values as Ollama takes them: "5m", "1h30m", "90s", seconds, 0 (unload after the
request) or any negative number (forever)."""
from __future__ import annotations

import math
import re

from server.errors import InvalidRequestError

__all__ = ["parse_keep_alive", "FOREVER"]

FOREVER = math.inf
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: str | float | int | None, param: str = "keep_alive") -> float | None:
    """Seconds (math.inf for forever), or None when not given."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidRequestError("keep_alive must be a duration such as \"5m\" or a number of seconds.", param=param)
    if isinstance(value, (int, float)):
        return FOREVER if value < 0 else float(value)
    text = value.strip().lower()
    if re.fullmatch(r"-?\d+(\.\d+)?", text):
        return parse_keep_alive(float(text), param)
    if text.startswith("-"):
        return FOREVER
    parts = _PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise InvalidRequestError(f"keep_alive `{value}` is not a duration such as \"5m\", \"90s\" or \"1h30m\".",
                                  param=param)
    return sum(float(n) * _UNIT[u] for n, u in parts)
