"""Bounds shared by the Lab's spec Structs (msgspec.Meta: the server decodes a request body into the
spec and a value out of bounds is a 400 naming the field, before any job exists). A spec built in
Python is not checked by msgspec: the engines keep their own ValueError checks for those.

What a bound does not cover, the working-memory estimate (lab_engines.working_memory) does: a spec
within every bound can still need more memory than the server has, and is refused at submission."""
from __future__ import annotations

from typing import Annotated

import msgspec

__all__ = ["MAX_ITEMS", "MAX_SHORT", "MAX_TEXT", "Seed", "ShortText", "Text", "Texts"]

MAX_TEXT = 32_768  # characters of a prompt or text (SmolLM2's 8192-token context is ~32k characters)
MAX_SHORT = 1_000  # characters of an answer, a subject, a note, a canary
MAX_ITEMS = 64  # texts in a list (reference texts, contrast prompts, memorization texts)

Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT)]
ShortText = Annotated[str, msgspec.Meta(max_length=MAX_SHORT)]
Texts = Annotated[list[Text], msgspec.Meta(max_length=MAX_ITEMS)]
Seed = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]

