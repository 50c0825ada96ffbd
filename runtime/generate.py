"""Generation loop shared by every model (reference or artifact): render the prompt, prefill, then
decode one token at a time, streaming text, until end of sentence or the token limit."""
from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .chat import Message, render
from .errors import UserError
from .sampling import Sampling, sample
from .speculative import DraftStats, Speculative
from .tokenizer import Tokenizer


def prompt_ids(tok: Tokenizer, prompt: str, chat: bool, thinking: bool = False, system: str = "") -> list[int]:
    text = render(([Message("system", system)] if system else []) + [Message("user", prompt)],
                  thinking=thinking) if chat else prompt
    ids = tok.encode(text)
    if not ids:
        raise UserError("the prompt encodes to no tokens")
    return ids


@dataclass(frozen=True)
class Generation:
    prompt_tokens: int                # fed this call: the prompt past the prefix already in the caches
    prefill_s: float
    new_tokens: int
    decode_s: float
    tokens: tuple[int, ...] = ()      # the generated ids, end of sentence excluded
    finish: str = "length"            # "stop" (end of sentence), "length" (max_new) or "cancelled"
    held: tuple[int, ...] = ()        # the drawn ids (end of sentence included) whose state the caches hold
    drafts: DraftStats | None = None  # speculative decoding's drafts, where it ran

    def line(self, what: str) -> str:
        drafts = (f"; {self.drafts.accepted} of {self.drafts.drafted} drafts accepted" if self.drafts else "")
        return (f"prefill {self.prompt_tokens} tokens: {self.prompt_tokens / max(self.prefill_s, 1e-9):.1f} tok/s; "
                f"decode {self.new_tokens} tokens: {self.new_tokens / max(self.decode_s, 1e-9):.1f} tok/s ({what})"
                + drafts)

    def fed(self, ids: list[int]) -> list[int]:
        """The ids whose state the model's caches hold after this generation from prompt `ids`: the prompt, then
        the drawn tokens that a step has taken (`held`). The next turn is fed from there: feeding a position
        again is not idempotent (a ratio-4 compressor shifts its state at a block's end)."""
        return list(ids) + list(self.held)


def generate(model, tok: Tokenizer, ids: list[int], max_new: int, emit: Callable[[str], None],
             sampling: Sampling = Sampling(), start: int = 0,
             cancelled: Callable[[], bool] = lambda: False) -> Generation:
    """`model` has `forward(ids [1, s], start) -> logits [1, vocab]` (and, an artifact, `decode_greedy`, which
    greedy decoding without penalties takes); the new tokens' text goes to `emit` as it completes (a character
    split over tokens, e.g. a CJK one in byte-level BPE, once whole). `start`: ids[:start] are already in the model's
    caches (a conversation's earlier turns), so only the rest is prefilled. `cancelled` is asked before each
    new token."""
    if not 0 <= start < len(ids):
        raise ValueError(f"start {start} must leave at least one of the {len(ids)} prompt tokens to feed")
    gen = torch.Generator().manual_seed(sampling.seed)
    t0 = time.time()
    logits = model.forward(torch.tensor([ids[start:]]), start)
    prefill = time.time() - t0
    tokens: list[int] = []
    finish = "length"
    text = tok.stream()
    t1 = time.time()
    first = sample(logits[0], sampling, gen)
    greedy = sampling.temperature <= 0 and not sampling.penalised
    speculative = None
    if not sampling.penalised and getattr(model, "drafter", None) is not None:    # drafts verified two a pass
        picks = speculative = Speculative(model, ids, first, max_new, sampling, gen)
    elif greedy and hasattr(model, "decode_greedy"):
        picks = itertools.chain([first], model.decode_greedy(first, len(ids), max_new - 1))   # the GPU a step ahead
    else:
        picks = sampled(model, first, len(ids), max_new, sampling, gen)
    drawn: list[int] = []
    for nxt in itertools.islice(picks, max(max_new, 0)):   # max_new 0: none, not even the first
        drawn.append(nxt)
        if nxt == tok.eos_id:
            finish = "stop"
            break
        tokens.append(nxt)
        piece = text.step(nxt)
        if piece:
            emit(piece)
        if cancelled():
            finish = "cancelled"
            break
    # the caches took every drawn token but the last, and that one too where a step ran ahead on it: the
    # device's greedy loop queues the next step before the host reads a token, from the second token on (the
    # first comes from the prompt's logits) and up to max_new; an accepted draft was fed to verify it
    if speculative is not None:
        last_fed = speculative.last_fed
    else:
        last_fed = greedy and hasattr(model, "decode_greedy") and 1 < len(drawn) < max_new
    took = len(drawn) if last_fed else max(len(drawn) - 1, 0)
    stats = speculative.stats if speculative is not None else None
    return Generation(len(ids) - start, prefill, len(tokens), time.time() - t1, tuple(tokens), finish,
                      tuple(drawn[:took]), stats)


def sampled(model, token: int, position: int, count: int, sampling: Sampling, gen: torch.Generator) -> Iterator[int]:
    """`token`, then each next token sampled from the logits of the one before, up to `count` in all."""
    counts = None                     # the penalties' counts of the tokens so far, once there are logits to size them
    for i in range(count):
        yield token
        if i + 1 < count:
            logits = model.forward(torch.tensor([[token]]), position + i)[0]
            if sampling.penalised:
                counts = torch.zeros_like(logits) if counts is None else counts
                counts[token] += 1
            token = sample(logits, sampling, gen, counts)


@dataclass(frozen=True)
class Turn:
    """One generation of a `Conversation`."""
    generation: Generation
    prompt_tokens: int                # the prompt's ids as fed: the cached ones, then the rest
    cached: int                       # of them already in the caches


class Conversation:
    """A model's caches and the text they hold. Generation from a prompt that extends that text (a chat's next
    turn: the last prompt, the answer as streamed, then the new turn) feeds only the rest, after the very ids
    the model saw; any other prompt starts from empty caches. Matching on text rather than on ids spares
    encoding the answer again, which need not give back the ids generated. With `keep` > 0 the states of that
    many other conversations are kept in host memory (`model.save_caches`): a prompt that extends one of them
    (a chat UI asks for a title between two turns of a chat) continues it instead. `model` also has
    `reset(batch)` and `max_len` (an artifact)."""

    def __init__(self, model, tok: Tokenizer, keep: int = 0):
        self.model, self.tok, self.keep = model, tok, keep
        self.fed: list[int] = []      # the ids whose state the caches hold, from position 0
        self.text = ""                # their text
        self.kept: OrderedDict[str, tuple[list[int], list]] = OrderedDict()   # text -> (ids, caches), oldest first

    def generate(self, text: str, max_new: int, emit: Callable[[str], None], sampling: Sampling = Sampling(),
                 cancelled: Callable[[], bool] = lambda: False) -> Turn:
        """Up to `max_new` tokens after `text`, or to the context's end."""
        if not self._extends(self.text, text):
            self._switch_to(text)
        if self.fed:
            ids, start = self.fed + self.tok.encode(text[len(self.text):]), len(self.fed)
        else:
            ids, start = self.tok.encode(text), 0
        if not ids:
            raise UserError("the prompt encodes to no tokens")
        room = self.model.max_len - len(ids)
        if room < 1:
            raise UserError(f"the prompt ({len(ids)} tokens) exceeds the model's context of {self.model.max_len}")
        self.forget()                 # until the generation ends, what the caches hold is not known
        done = generate(self.model, self.tok, ids, min(max_new, room), emit, sampling, start=start,
                        cancelled=cancelled)
        self.fed = done.fed(ids)
        # (an answer cut by max_new whose unfed last token completes a character leaves U+FFFD at the end of
        # this text: its next turn misses and is prefilled afresh, which costs time, not correctness)
        self.text = text + self.tok.decode(self.fed[len(ids):])
        return Turn(done, len(ids), start)

    @staticmethod
    def _extends(held: str, text: str) -> bool:
        return bool(held) and len(text) > len(held) and text.startswith(held)

    def _switch_to(self, text: str) -> None:
        """Put the live conversation aside (the `keep` most recent) and take up the kept one that `text` extends
        furthest, or empty caches."""
        found = max((held for held in self.kept if self._extends(held, text)), key=len, default=None)
        taken = self.kept.pop(found) if found is not None else None
        if self.keep and self.fed:
            self.kept.pop(self.text, None)
            self.kept[self.text] = (self.fed, self.model.save_caches())
            while len(self.kept) > self.keep:
                self.kept.popitem(last=False)
        if taken is None:
            self.forget()
            self.model.reset(1)
            return
        self.model.load_caches(taken[1])
        self.fed, self.text = taken[0], found

    def forget(self) -> None:
        """The caches' state is not known (a failed or interrupted generation): the next prompt starts afresh."""
        self.fed, self.text = [], ""
