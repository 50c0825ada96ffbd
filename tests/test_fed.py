"""What a generation says its caches hold (`Generation.fed`) is what they hold, on the tiny CPU artifact
(float32: prefill and decode agree bit for bit). A conversation's next turn is fed from there, so a token the
caches took but `fed` left out is fed again at its position; at the end of a ratio-4 block that shifts the
compressor's state a second time and corrupts the block's compressed row."""
import itertools

import pytest
import torch

from runtime.artifact import ArtifactModel
from runtime.generate import generate
from runtime.sampling import Sampling
from runtime.tokenizer import Tokenizer
from helpers import EndsAt

pytestmark = pytest.mark.slow            # the tiny artifact's build (conftest `built`)




@pytest.mark.parametrize("how", ["stop", "cancelled"])
@pytest.mark.parametrize("sampling", [Sampling(), Sampling(frequency_penalty=0.5)], ids=["greedy", "stepped"])
def test_a_turn_fed_after_an_answer_that_ended_early_continues_as_a_fresh_prefill(built, sampling, how):
    out = built[0]
    tok = Tokenizer(out)
    model = ArtifactModel(out, draft=False)      # greedy: the device's loop a step ahead (speculative: test_speculative)
    ids = tok.encode("Tell me about the sea, the sky and the stars.")
    drawn = generate(model, tok, ids, 24, lambda text: None, sampling).tokens
    # the first token drawn at a ratio-4 block's last position, not drawn before: where the answer ends
    k = next(k for k in range(1, len(drawn)) if (len(ids) + k + 1) % 4 == 0 and drawn[k] not in drawn[:k])
    model.reset(1)
    if how == "stop":
        done = generate(model, EndsAt(tok, drawn[k]), ids, 24, lambda text: None, sampling)
        assert (done.tokens, done.finish) == (drawn[:k], "stop")
    else:
        asked = itertools.count()             # once after each token
        done = generate(model, tok, ids, 24, lambda text: None, sampling, cancelled=lambda: next(asked) == k)
        assert (done.tokens, done.finish) == (drawn[:k + 1], "cancelled")
    fed = done.fed(ids)
    more = tok.encode(" And then?")
    continued = model.forward(torch.tensor([more]), len(fed))
    model.reset(1)
    fresh = model.forward(torch.tensor([fed + more]), 0)
    assert torch.equal(continued, fresh)
