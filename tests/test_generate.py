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

    def stream(self):
        return type("DigitStream", (), {"step": staticmethod(str)})()


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


class Scripted:
    """A model that draws `script` in order, whatever it is fed; records (ids, start) of each forward."""

    def __init__(self, script: list[int], vocab: int):
        self.script, self.vocab, self.calls = list(script), vocab, []

    def forward(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        self.calls.append((ids[0].tolist(), start))
        logits = torch.zeros(1, self.vocab)
        logits[0, self.script.pop(0)] = 1.0
        return logits


def test_a_cached_prefix_is_not_fed_again_and_fed_names_what_the_caches_hold():
    model = Scripted([4, 5, EOS], 10)
    done = generate(model, Digits(), [1, 2, 3], 10, lambda text: None, start=2)
    assert model.calls == [([3], 2), ([4], 3), ([5], 4)]            # the prompt past the prefix, then each token
    assert (done.prompt_tokens, done.tokens, done.finish) == (1, (4, 5), "stop")
    assert done.fed([1, 2, 3]) == [1, 2, 3, 4, 5]                    # end of sentence drawn, never fed
    short = generate(Scripted([4, 5], 10), Digits(), [1, 2, 3], 2, lambda text: None)
    assert (short.finish, short.fed([1, 2, 3])) == ("length", [1, 2, 3, 4])   # the last token drawn is not fed


def test_a_cancelled_generation_stops_after_the_token_it_was_asked_at():
    model = Scripted([4, 5, 6, 7], 10)
    done = generate(model, Digits(), [1], 10, lambda text: None, cancelled=lambda: len(model.calls) == 2)
    assert (done.tokens, done.finish, done.fed([1])) == ((4, 5), "cancelled", [1, 4])


def test_streamed_text_holds_whole_characters_only(tiny_dir):
    """Byte-level BPE splits a CJK character over several tokens: each streamed piece is whole text (a token
    decoded alone printed U+FFFD) and the pieces add up to the text."""
    from runtime.tokenizer import Tokenizer
    tok = Tokenizer(tiny_dir)
    text = "深度求索 says héllo"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)          # the case this guards
    pieces = []
    generate(Scripted(ids + [tok.eos_id], tok.vocab_size), tok, [tok.bos_id], 50, pieces.append)
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_penalties_take_the_step_by_step_path():
    """The device's greedy pick knows no penalties: with them, each step's logits come back to the host."""
    from runtime.sampling import Sampling
    model = NextTokenGreedy()
    generate(model, Digits(), [3], 3, lambda text: None, Sampling(frequency_penalty=0.5))
    assert model.calls == [0, 1, 2]


def test_a_judged_draft_keeps_the_models_distribution():
    """Speculative sampling keeps a draft with its probability, else draws from the rest: over many draws the
    tokens follow the distribution itself (a draft likely, unlikely, or outside the nucleus)."""
    from runtime.sampling import Sampling, judge, probabilities
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 1.5, 0.2])
    s = Sampling(temperature=0.8, top_p=0.9)
    p = probabilities(logits, s)
    assert p[5] == 0                                                 # outside the nucleus
    gen = torch.Generator().manual_seed(1)
    for draft in (0, 3, 5):
        draws = [judge(logits, draft, s, gen) for _ in range(20000)]
        freq = torch.bincount(torch.tensor([t for t, _ in draws]), minlength=8) / len(draws)
        assert (freq - p).abs().max() < 0.015, (draft, freq, p)
        kept = sum(ok for _, ok in draws) / len(draws)
        assert abs(kept - float(p[draft])) < 0.015 and all(ok == (t == draft) for t, ok in draws)
    assert judge(logits, 6, Sampling(), gen) == (0, False) and judge(logits, 0, Sampling(), gen) == (0, True)
