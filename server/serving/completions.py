"""Text completions: Deltas -> one `text_completion`, or its SSE chunks. Choice index
`p * n + j` is the j-th sample of prompt p, as OpenAI numbers them."""
from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from adapters.base import TokenLogprob
from adapters.errors import EngineError
from server.protocol.completions import Completion, CompletionChoice, CompletionLogprobs
from server.serving.chat import total_usage
from server.serving.run import Generation
from server.serving.sse import DONE, error_event, event

__all__ = ["CompletionJob", "text_completion", "completion_events"]


class CompletionJob:
    """One choice: its generation, and the echoed prompt (with its scored tokens) if asked."""

    def __init__(self, gen: Generation, prompt: str, echo: bool, logprobs: int | None) -> None:
        self.gen, self.prompt, self.echo, self.logprobs = gen, prompt, echo, logprobs
        self.offset = 0
        self.prefix: tuple[str, list[TokenLogprob]] | None = None

    async def begin(self) -> tuple[str, list[TokenLogprob]]:
        """Score the echoed prompt (if asked), then start generating: in this order, because the
        model's worker serves one job at a time."""
        if self.prefix is None:
            scored = []
            if self.echo and self.logprobs is not None:
                top = self.logprobs
                try:
                    scored = await self.gen.worker.call(lambda adapter: adapter.score_prompt(self.prompt, top))
                except EngineError as exc:
                    raise self.gen.surface.error(exc) from exc
            self.prefix = (self.prompt if self.echo else "", scored)
            await self.gen.start()
        return self.prefix

    def logprobs_of(self, items: list[TokenLogprob]) -> CompletionLogprobs | None:
        if self.logprobs is None:
            return None
        tokens, token_lps, tops, offsets = [], [], [], []
        for item in items:
            offsets.append(self.offset)
            tokens.append(item.token)
            token_lps.append(item.logprob)
            tops.append(None if item.logprob is None else {a.token: a.logprob for a in item.top})
            self.offset += len(item.token)
        return CompletionLogprobs(tokens, token_lps, tops, offsets)


async def text_completion(jobs: list[CompletionJob], model: str) -> Completion:
    choices, usages = [], []
    for index, job in enumerate(jobs):
        text, scored = await job.begin()
        parts, items, last = [text], list(scored), None
        async for delta in job.gen.deltas():
            parts.append(delta.text)
            items += delta.logprobs or []
            last = delta
        choices.append(CompletionChoice(index=index, text="".join(parts), finish_reason=last.finish_reason,
                                        logprobs=job.logprobs_of(items)))
        usages.append(last.usage)
    return Completion(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model, choices=choices,
                      usage=_usage(jobs, usages))


def _usage(jobs: list[CompletionJob], usages):
    """Each distinct prompt counts once; every choice's completion counts."""
    usage = total_usage(usages)
    prompts = {}
    for job, u in zip(jobs, usages):
        if u is not None:
            prompts[job.prompt] = u.prompt_tokens
    usage.prompt_tokens = sum(prompts.values())
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
    return usage


async def completion_events(jobs: list[CompletionJob], model: str, include_usage: bool) -> AsyncIterator[bytes]:
    chunk_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    usages = []

    def chunk(index: int, text: str, finish_reason: str | None, logprobs) -> bytes:
        return event(Completion(id=chunk_id, created=created, model=model,
                                choices=[CompletionChoice(index, text, finish_reason, logprobs)]))

    try:
        for index, job in enumerate(jobs):
            text, scored = await job.begin()
            if text:
                yield chunk(index, text, None, job.logprobs_of(scored))
            async for delta in job.gen.deltas():
                if delta.text or delta.finish_reason is not None:
                    yield chunk(index, delta.text, delta.finish_reason, job.logprobs_of(delta.logprobs or []))
                if delta.usage is not None:
                    usages.append(delta.usage)
        if include_usage:
            yield event(Completion(id=chunk_id, created=created, model=model, choices=[], usage=_usage(jobs, usages)))
    except Exception as exc:
        yield error_event(exc)
    yield DONE
