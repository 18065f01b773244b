"""Function calling for any chat model: tool prompts, the JSON schema that constrains a forced
call, and the parser that turns the model's output into tool-call events as it streams."""
from __future__ import annotations

import json
import re
import uuid
from typing import Any

import msgspec

__all__ = ["ToolMode", "tool_mode", "tool_system_prompt", "forced_call_schema", "replay_tool_calls",
           "ForcedCallParser", "parse_auto_call", "new_call_id"]

# The arguments start at the first visible character after `"arguments":`.
CALL_PREFIX = re.compile(r'^\s*\{\s*"name"\s*:\s*"(?P<name>(?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\S)')


class ToolMode(msgspec.Struct):
    """none: tools ignored; auto: the model may call one; forced: it must call one of `names`."""

    kind: str  # "none" | "auto" | "forced"
    names: list[str] = []


def tool_mode(tools: list | None, tool_choice: Any) -> ToolMode:
    if not tools or tool_choice == "none":
        return ToolMode("none")
    names = [t.function.name for t in tools]
    if tool_choice is None or tool_choice == "auto":
        return ToolMode("auto", names)
    if tool_choice == "required":
        return ToolMode("forced", names)
    return ToolMode("forced", [tool_choice.function.name])


def tool_system_prompt(tools: list, mode: ToolMode) -> str:
    specs = [{"name": t.function.name, "description": t.function.description or "",
              "parameters": t.function.parameters or {"type": "object"}}
             for t in tools if t.function.name in mode.names]
    how = ("You must call one of these functions" if mode.kind == "forced"
           else "You may call one of these functions when it helps answer")
    return (f"{how}:\n{json.dumps(specs, ensure_ascii=False)}\n"
            'To call a function, reply with only a JSON object: {"name": <function name>, "arguments": '
            "<arguments object>}. Otherwise reply normally.")


def forced_call_schema(tools: list, mode: ToolMode) -> dict[str, Any]:
    """One object {"name": <one of the names>, "arguments": <that function's parameters>}."""
    options = []
    for t in tools:
        if t.function.name in mode.names:
            params = t.function.parameters or {"type": "object"}
            options.append({"type": "object", "properties": {"name": {"const": t.function.name}, "arguments": params},
                            "required": ["name", "arguments"], "additionalProperties": False})
    return options[0] if len(options) == 1 else {"anyOf": options}


def replay_tool_calls(tool_calls: list) -> str:
    """An assistant turn that called tools, as the text the model would have written."""
    calls = []
    for call in tool_calls:
        try:
            arguments = json.loads(call.function.arguments or "{}")
        except json.JSONDecodeError:
            arguments = call.function.arguments
        calls.append(json.dumps({"name": call.function.name, "arguments": arguments}, ensure_ascii=False))
    return "\n".join(calls)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ForcedCallParser:
    """Reads `{"name": "...", "arguments": {...}}` as the grammar forces it, token by token.
    push() returns (name once it is complete, argument text safe to send now); the argument text
    never includes the object's closing brace, so the fragments join to exactly `arguments`."""

    def __init__(self) -> None:
        self.text = ""
        self.name: str | None = None
        self._args_start = 0
        self._sent = 0

    def push(self, piece: str) -> tuple[str | None, str]:
        self.text += piece
        new_name = None
        if self.name is None:
            match = CALL_PREFIX.match(self.text)
            if match is None:
                return None, ""
            self.name = new_name = json.loads(f'"{match.group("name")}"')
            self._args_start = match.end()
        args = self.text[self._args_start:]
        # Everything before the last `}` is safe (that one may close the call object itself).
        safe = len(args[: args.rfind("}")].rstrip()) if "}" in args else len(args.rstrip())
        return new_name, self._take(args, safe)

    def finish(self) -> tuple[str | None, str]:
        """At the end: the rest of the arguments (all of it if the output was cut off)."""
        if self.name is None:
            return None, ""
        args = self.text[self._args_start:].rstrip()
        if args.endswith("}") and _is_json(args[:-1]):
            args = args[:-1].rstrip()
        return None, self._take(args, len(args))

    def _take(self, args: str, upto: int) -> str:
        fragment = args[self._sent:upto] if upto > self._sent else ""
        self._sent = max(self._sent, upto)
        return fragment


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def parse_auto_call(text: str, names: list[str]) -> tuple[str, str] | None:
    """(name, arguments) if a whole reply is one call of a known function, else None."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or data.get("name") not in names or not isinstance(data.get("arguments"), dict):
        return None
    return data["name"], json.dumps(data["arguments"], ensure_ascii=False)
