"""Tokenizer loading (Hugging Face `tokenizer.json`) with DeepSeek V4's special tokens."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.decoders import DecodeStream

from .errors import UserError

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
END_THINK = "</think>"


class Tokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"no tokenizer.json at {path}")
        try:
            self.hf = _HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise UserError(f"{path} is not a valid tokenizer.json: {e}") from None
        self.path = path
        missing = [t for t in (BOS, EOS, USER, ASSISTANT, THINK, END_THINK) if self.hf.token_to_id(t) is None]
        if missing:
            raise UserError(f"{path} lacks DeepSeek V4 special token {missing[0]!r}")
        self.bos_id = self.hf.token_to_id(BOS)
        self.eos_id = self.hf.token_to_id(EOS)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in the text are recognised, none are added."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special)

    def stream(self) -> "TextStream":
        """An incremental decoder for generated ids: whole characters only, as they complete."""
        return TextStream(self.hf)


class TextStream:
    """Text of ids fed one at a time (tokenizers' DecodeStream): `step(id)` is the text that id completes, or
    None while it ends inside a character (byte-level BPE splits a CJK character over up to three tokens,
    which decoded alone print as U+FFFD)."""

    def __init__(self, hf: _HFTokenizer):
        self.hf, self.decoder = hf, DecodeStream(skip_special_tokens=False)

    def step(self, token: int) -> str | None:
        return self.decoder.step(self.hf, token)
