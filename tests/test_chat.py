import pytest

from builder.tokenizer_train import SPECIAL_TOKENS
from runtime.chat import Message, render
from runtime.errors import UserError
from runtime.tokenizer import Tokenizer

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
U, A = "<｜User｜>", "<｜Assistant｜>"
TURNS = [Message("system", "SYS"), Message("user", "U1"), Message("assistant", "A1", reasoning="R1"),
         Message("user", "U2")]


def test_chat_mode():
    assert render(TURNS) == f"{BOS}SYS{U}U1{A}</think>A1{EOS}{U}U2{A}</think>"


def test_thinking_mode_drops_earlier_reasoning():
    assert render(TURNS, thinking=True) == f"{BOS}SYS{U}U1{A}</think>A1{EOS}{U}U2{A}<think>"


def test_thinking_mode_keeping_reasoning():
    assert render(TURNS, thinking=True, keep_reasoning=True) == \
        f"{BOS}SYS{U}U1{A}<think>R1</think>A1{EOS}{U}U2{A}<think>"


def test_completed_turns_and_errors():
    done = TURNS + [Message("assistant", "A2", reasoning="R2")]
    assert render(done, thinking=True).endswith(f"{U}U2{A}<think>R2</think>A2{EOS}")
    assert render(done).endswith(f"{U}U2{A}</think>A2{EOS}")
    assert render([Message("user", "hi")]) == f"{BOS}{U}hi{A}</think>"
    with pytest.raises(UserError):
        render([Message("user", "a"), Message("system", "late")])
    with pytest.raises(UserError):
        render([Message("robot", "a")])


def test_tokenizer_knows_deepseek_special_tokens(tiny_dir):
    tok = Tokenizer(tiny_dir)
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    ids = tok.encode(render(TURNS, thinking=True))
    assert ids[0] == 0 and tok.hf.token_to_id(SPECIAL_TOKENS[3]) in ids
    assert tok.decode(ids) == render(TURNS, thinking=True)
    assert tok.decode(tok.encode("Hello, world! 12345 模型")) == "Hello, world! 12345 模型"
