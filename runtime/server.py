"""An OpenAI-compatible HTTP server over one loaded artifact (`dsv4 serve`).

POST /v1/chat/completions and /v1/completions, whole or streamed as server-sent events; GET /v1/models and
/health. The model serves one request at a time (decode batch 1) on a worker thread that owns it; the others
wait their turn in arrival order. A conversation's next turn starts where the last one ended when its prompt
extends the text the caches hold (runtime.generate.Conversation; usage.prompt_tokens_details.cached_tokens
counts the ids not fed again), so a chat client that resends the whole history pays only for the new turn's
prefill. The answers' shapes are runtime/openai_reply.py's.

DeepSeek conventions: `chat_template_kwargs: {"thinking": true}` opens the answer with <think>, and the
thinking comes back as `reasoning_content` beside `content` (as DeepSeek's API and vLLM give it).
"""
from __future__ import annotations

import asyncio
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .chat import Message, render
from .errors import UserError
from .generate import Conversation, Turn
from .openai_reply import EngineError, Reply, Split
from .sampling import Sampling
from .tokenizer import Tokenizer


class BadRequest(Exception):
    """A request the server refuses: HTTP 400 with OpenAI's error body naming the parameter."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class Job:
    """One request's generation, handed to the worker; its results come back on `out` in the server's loop."""
    text: str                         # the prompt (a chat rendered)
    max_new: int
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False           # set by the server (client gone, a stop string met), read by the worker

    def put(self, kind: str, value: Any) -> None:
        """From the worker thread: ("text", piece), ("done", Turn) or ("error", (HTTP status, message))."""
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, (kind, value))
        except RuntimeError:          # the server's loop is closed: nobody is listening
            self.cancelled = True


class Engine:
    """A model's `Conversation` on a worker thread, one job at a time."""

    def __init__(self, model, tok: Tokenizer, log: Callable[[str], None] = lambda line: None, keep: int = 0):
        self.model, self.tok, self.log = model, tok, log
        self.conversation = Conversation(model, tok, keep)
        self.jobs: queue.Queue[Job] = queue.Queue()
        threading.Thread(target=self._work, name="dsv4-engine", daemon=True).start()

    def _work(self) -> None:
        device = getattr(self.model, "device", None)
        if device is not None and device.type == "cuda":
            torch.cuda.set_device(device)     # a thread starts on the default GPU: make it the model's
        while True:
            job = self.jobs.get()
            if job.cancelled:
                job.put("done", None)
                continue
            try:
                job.put("done", self._run(job))
            except UserError as e:    # the request's own fault (e.g. past the context), found in the worker
                job.put("error", (400, str(e)))
            except Exception as e:    # the caches' state is unknown: the next request starts afresh
                self.conversation.forget()
                self.log(f"error: a request failed: {type(e).__name__}: {e}")
                job.put("error", (500, f"{type(e).__name__}: {e}"))

    def _run(self, job: Job) -> Turn:
        turn = self.conversation.generate(job.text, job.max_new, lambda piece: job.put("text", piece), job.sampling,
                                          cancelled=lambda: job.cancelled)
        self.log(turn.generation.line(f"{turn.cached} prompt tokens cached, {turn.generation.finish}"))
        return turn


# Request bodies: the OpenAI fields this server honours; others clients commonly send are accepted and
# ignored, and those whose meaning it cannot give (several choices, log-probabilities, tools) are refused.
class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    n: int = 1
    logprobs: bool | int | None = None

    def refuse_unsupported(self) -> None:
        if self.n != 1:
            raise BadRequest("only n = 1 is supported", "n")
        if self.logprobs:
            raise BadRequest("logprobs are not supported", "logprobs")


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str = ""


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[_Part] | None = None
    reasoning_content: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            if any(p.type != "text" for p in self.content):
                raise BadRequest("only text content parts are supported", "messages")
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(_Request):
    messages: list[_Message]
    max_completion_tokens: int | None = Field(None, ge=1)
    chat_template_kwargs: dict[str, Any] = {}
    tools: list[Any] | None = None


class CompletionRequest(_Request):
    prompt: str


def make_app(engine: Engine, model_name: str, api_key: str | None = None) -> FastAPI:
    """The HTTP application over `engine`, which answers to `model_name`; with `api_key`, the /v1 routes take
    only requests that carry it (`Authorization: Bearer KEY`, as OpenAI's clients send their key)."""
    app = FastAPI(title="dsv4-aot", description="OpenAI-compatible server over one DeepSeek V4 artifact")
    tok, max_len, created = engine.tok, engine.model.max_len, int(time.time())

    def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)

    if api_key:
        expected = f"Bearer {api_key}".encode()

        @app.middleware("http")
        async def authorise(request: Request, call_next):
            given = request.headers.get("authorization", "").encode()
            if request.url.path.startswith("/v1/") and not secrets.compare_digest(given, expected):
                return error(401, "a valid API key is needed (Authorization: Bearer KEY)", kind="authentication_error")
            return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if p != "body")
        return error(400, f"{param}: {first['msg']}", param)

    @app.exception_handler(BadRequest)
    async def refused(request: Request, exc: BadRequest):
        return error(400, str(exc), exc.param)

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError):
        return error(400, str(exc))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "dsv4-aot", "max_model_len": max_len}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        req.refuse_unsupported()
        if req.tools:
            raise BadRequest("tools are not supported", "tools")
        if not req.messages or req.messages[-1].role != "user":
            raise BadRequest("the last message must be the user's (the answer follows it)", "messages")
        thinking = bool(req.chat_template_kwargs.get("thinking", False))
        messages = [Message(m.role, m.text(), m.reasoning_content or "") for m in req.messages]
        return await answer(req, render(messages, thinking=thinking), req.max_completion_tokens or req.max_tokens,
                            thinking, chat=True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        req.refuse_unsupported()
        return await answer(req, req.prompt, req.max_tokens, False, chat=False)

    async def answer(req: _Request, text: str, max_new: int | None, thinking: bool, chat: bool):
        ids = tok.encode(text)        # to check the context here; the worker may feed a prefix's own ids
        if not ids:
            raise BadRequest("the prompt encodes to no tokens", "prompt")
        room = max_len - len(ids)
        if room < 1 or (max_new is not None and max_new > room):
            asked = "" if max_new is None else f" + {max_new} new"
            raise BadRequest(f"the prompt ({len(ids)} tokens){asked} exceeds the model's context of {max_len} "
                             "tokens", "messages" if chat else "prompt")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        seed = req.seed if req.seed is not None else secrets.randbits(31)
        sampling = Sampling(req.temperature, req.top_p, seed, req.presence_penalty, req.frequency_penalty)
        job = Job(text, max_new or room, sampling, asyncio.get_running_loop())
        reply = Reply(chat, model_name, Split(thinking, stops), len(ids))
        engine.jobs.put(job)
        if req.stream:
            usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(reply.events(job, usage), media_type="text/event-stream")
        try:
            async for _ in reply.parts(job):
                pass
        except EngineError as e:
            return error(e.status, str(e), kind="invalid_request_error" if e.status == 400 else "server_error")
        finally:
            job.cancelled = True      # a handler cancelled midway leaves the worker nothing to do
        return reply.whole()

    return app
