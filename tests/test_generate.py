"""The generation loop on stand-in models: streaming, the stop at end of sentence, the token limit, and the
artifact's greedy path (`decode_greedy`) against the step-by-step one."""
import torch

from runtime.generate import generate

EOS = 9


class NextToken:
    """A model whose logits always favour the last token + 1; records its calls."""

    def __init__(self):
        self.calls = []

    def forward(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        self.calls.append(start)
        logits = torch.zeros(1, 10)
        logits[0, (int(ids[0, -1]) + 1) % 10] = 1.0
        return logits


class NextTokenGreedy(NextToken):
    """The same, with an artifact's greedy decoding."""

    def decode_greedy(self, token: int, position: int, count: int):
        for i in range(count):
            self.calls.append(("greedy", position + i))
            token = (token + 1) % 10
            yield token


class Digits:
    eos_id = EOS

    def decode(self, ids: list[int]) -> str:
        return "".join(map(str, ids))


def run(model, max_new: int) -> list[str]:
    out = []
    timing = generate(model, Digits(), [3], max_new, out.append)
    assert timing.new_tokens == len(out)
    return out


def test_generation_streams_until_end_of_sentence_or_the_limit_on_either_path():
    for model in (NextToken, NextTokenGreedy):
        assert run(model(), 10) == ["4", "5", "6", "7", "8"]          # 9 ends it, unprinted
        assert run(model(), 2) == ["4", "5"]
        assert run(model(), 0) == []


def test_no_step_runs_past_the_last_token_wanted():
    stepped = NextToken()
    run(stepped, 2)
    assert stepped.calls == [0, 1]                 # the prompt, then the step that gives the second token
    greedy = NextTokenGreedy()
    run(greedy, 2)
    assert greedy.calls == [0, ("greedy", 1)]
