"""OpenAI's answer shapes for one request of `dsv4 serve` (runtime/server.py): the text as it arrives from the
worker, split into reasoning_content and content (thinking mode), cut at stop strings, given back whole or as
stream chunks (server-sent events)."""
from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING, AsyncIterator

from .tokenizer import END_THINK

if TYPE_CHECKING:
    from .server import Job


class EngineError(RuntimeError):
    """A request failed in the worker: its HTTP status (400: the request's fault, 500: the model's) and message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class StopStrings:
    """Cuts streamed text at the first of `stops`: text that may begin a stop string is held back until the
    next piece settles it."""

    def __init__(self, stops: list[str]):
        self.stops, self.held, self.hit = [s for s in stops if s], "", False

    def feed(self, piece: str) -> str:
        """The part of `piece` (after what was held) that can be shown now; nothing once a stop string is met."""
        if self.hit:
            return ""
        text = self.held + piece
        at = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if at >= 0:
            self.hit, self.held = True, ""
            return text[:at]
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


class Split:
    """Routes an answer's text to reasoning_content until </think> (thinking mode), then to content, where the
    stop strings apply."""

    def __init__(self, thinking: bool, stops: list[str]):
        self.thinking, self.stop = thinking, StopStrings(stops)

    def feed(self, piece: str) -> list[tuple[str, str]]:
        parts = []
        if self.thinking:
            if END_THINK not in piece:
                return [("reasoning_content", piece)] if piece else []
            before, piece = piece.split(END_THINK, 1)
            self.thinking = False
            parts.append(("reasoning_content", before))
        parts.append(("content", self.stop.feed(piece)))
        return [(k, v) for k, v in parts if v]

    def flush(self) -> list[tuple[str, str]]:
        rest = self.stop.flush()
        return [("content", rest)] if rest else []


class Reply:
    """One request's answer as it arrives from the worker, whole or as OpenAI stream chunks."""

    def __init__(self, chat: bool, model: str, split: Split, prompt_tokens: int):
        self.chat, self.model, self.split, self.prompt_tokens = chat, model, split, prompt_tokens
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.text: dict[str, str] = {"reasoning_content": "", "content": ""}
        self.finish, self.done = "stop", None

    async def parts(self, job: Job) -> AsyncIterator[tuple[str, str]]:
        """(field, text) pieces as the worker makes them; afterwards `finish` and `done` are set."""
        while True:
            kind, value = await job.out.get()
            if kind == "error":
                raise EngineError(*value)
            if kind == "done":
                break
            for part in self.split.feed(value):
                self.text[part[0]] += part[1]
                yield part
            if self.split.stop.hit:
                job.cancelled = True  # the worker stops at its next token; its text is dropped
        for part in self.split.flush():
            self.text[part[0]] += part[1]
            yield part
        if value is not None:
            self.done = value
            self.finish = "length" if value.generation.finish == "length" and not self.split.stop.hit else "stop"

    def usage(self) -> dict:
        prompt, new, cached = ((self.done.prompt_tokens, self.done.generation.new_tokens, self.done.cached)
                               if self.done else (self.prompt_tokens, 0, 0))
        return {"prompt_tokens": prompt, "completion_tokens": new, "total_tokens": prompt + new,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def _object(self, chunk: bool) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def whole(self) -> dict:
        if self.chat:
            message = {"role": "assistant", "content": self.text["content"]}
            if self.text["reasoning_content"]:
                message["reasoning_content"] = self.text["reasoning_content"]
            choice = {"index": 0, "message": message, "finish_reason": self.finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": self.text["content"], "finish_reason": self.finish, "logprobs": None}
        return {**self._object(False), "choices": [choice], "usage": self.usage()}

    def _chunk(self, delta: dict, finish: str | None = None) -> str:
        choice = {"index": 0, "finish_reason": finish, "logprobs": None}
        choice |= {"delta": delta} if self.chat else {"text": delta.get("content", "")}
        return self._event({**self._object(True), "choices": [choice]})

    @staticmethod
    def _event(body: dict | str) -> str:
        return f"data: {body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)}\n\n"

    async def events(self, job: Job, usage: bool) -> AsyncIterator[str]:
        """The answer as server-sent events: a first chunk (the assistant's role), one per piece of text, one
        with the finish reason, the usage when asked for, then [DONE]. A client gone cancels the job."""
        try:
            if self.chat:
                yield self._chunk({"role": "assistant", "content": ""})
            try:
                async for name, text in self.parts(job):
                    yield self._chunk({name: text})
            except EngineError as e:
                kind = "invalid_request_error" if e.status == 400 else "server_error"
                yield self._event({"error": {"message": str(e), "type": kind, "param": None, "code": None}})
                return
            yield self._chunk({}, self.finish)
            if usage:
                yield self._event({**self._object(True), "choices": [], "usage": self.usage()})
            yield self._event("[DONE]")
        finally:
            job.cancelled = True
