"""Speculative decoding with the MTP block (runtime/speculative.py) on the tiny CPU artifact, float32: the
two-token verification computes bit for bit what one-token steps compute, so the tokens must be exactly
the plain greedy ones, whatever is drafted. The tiny model's weights are random, so its MTP block's drafts
are nearly all rejected; a drafter that knows the answer (`helpers.KnownDrafts`) drives the accepted path too."""
import itertools

import pytest
import torch

from builder.checkpoint import Checkpoint
from builder.reference.model import ReferenceModel
from runtime.artifact import ArtifactModel
from runtime.generate import generate
from runtime.speculative import Speculative
from runtime.tokenizer import Tokenizer
from helpers import EndsAt, KnownDrafts

pytestmark = pytest.mark.slow            # the tiny artifact's build (conftest `built`)

PROMPT = "Tell me about the sea, the sky and the stars, and then about the mountains."
NEW = 40


@pytest.fixture(scope="module")
def plain(built):
    """(tokenizer, prompt ids, the plain greedy tokens after them: the artifact without its drafter)."""
    out = built[0]
    tok = Tokenizer(out)
    ids = tok.encode(PROMPT)
    model = ArtifactModel(out, draft=False)
    assert model.drafter is None
    return tok, ids, generate(model, tok, ids, NEW, lambda text: None).tokens


def test_the_drafter_loads_where_the_artifact_has_its_programs(built):
    model = ArtifactModel(built[0], draft=True)
    assert model.drafter is not None and model.verify_runs is not None
    assert model.verify_decode                         # the verification programs (builder/programs/verify.py)
    assert set(model.drafter.sizes) == {2, model.config.sliding_window}


def test_speculative_tokens_are_the_plain_greedy_tokens(built, plain):
    tok, ids, expect = plain
    model = ArtifactModel(built[0], draft=True)
    done = generate(model, tok, ids, NEW, lambda text: None)
    assert done.tokens == expect and done.drafts is not None and done.drafts.drafted > 0
    assert "drafts accepted" in done.line("tiny")


@pytest.mark.parametrize("pattern", [lambda i: True, lambda i: i % 3 != 0, lambda i: i % 2 == 0],
                         ids=["all-right", "two-of-three", "every-other"])
def test_accepted_and_rejected_drafts_give_the_plain_greedy_tokens(built, plain, pattern):
    tok, ids, expect = plain
    model = ArtifactModel(built[0], draft=True)
    model.drafter = KnownDrafts(model.drafter, ids + list(expect), pattern, model.config.vocab_size)
    done = generate(model, tok, ids, NEW, lambda text: None)
    assert done.tokens == expect
    assert done.drafts.accepted > 0
    if pattern(3) is False:                            # rejections too, some at a ratio-4 block's end
        assert done.drafts.accepted < done.drafts.drafted


def test_sampled_drafts_are_judged_by_the_models_distribution(built, plain):
    """Sampling with drafts (`runtime.sampling.judge`): at a temperature so low that the distribution is the
    argmax's, accepted and rejected drafts give the greedy tokens; at 0.8 a seed gives the same tokens again.
    (That judged drafts follow the distribution: tests/test_generate.py.)"""
    from runtime.sampling import Sampling
    tok, ids, expect = plain
    model = ArtifactModel(built[0], draft=True)
    mtp = model.drafter
    model.drafter = KnownDrafts(mtp, ids + list(expect), lambda i: i % 2 == 0, model.config.vocab_size)
    cold = generate(model, tok, ids, NEW, lambda text: None, Sampling(temperature=1e-4, seed=3))
    assert cold.tokens == expect and 0 < cold.drafts.accepted < cold.drafts.drafted
    model.drafter = mtp
    runs = []
    for _ in range(2):
        model.reset(1)
        runs.append(generate(model, tok, ids, NEW, lambda text: None, Sampling(temperature=0.8, seed=5)))
    assert runs[0].tokens == runs[1].tokens != expect and runs[0].drafts.drafted > 0


def test_the_draft_is_the_reference_mtp_blocks_greedy_token(built, tiny_dir, plain):
    """After a prompt, the drafter (fed the prompt's last window of positions) drafts what the reference MTP
    block, fed every position, gives at the last one."""
    tok, ids, expect = plain
    model = ArtifactModel(built[0], draft=True)
    model.reset(1)
    model.forward(torch.tensor([ids]), 0)
    nxt = ids[1:] + [expect[0]]
    start = max(0, len(ids) - model.recent.size(1))
    got = model.drafter.draft(nxt[start:], start)
    ref = ReferenceModel(Checkpoint(tiny_dir), act=torch.float32, max_len=model.max_len)
    h = ref.hidden(torch.tensor([ids]), 0)
    want = int(ref.mtp[0].draft(h, 0, torch.tensor([nxt])).argmax(-1)[0])
    assert got == want


def test_the_verification_leaves_the_drafters_inputs_as_two_steps_do(built, plain):
    """The drafter drafts from the main model's last streams at the positions settled (`recent`): after a
    verification they are what two one-token steps leave, bit for bit in float32 (the tokens alone would not
    show a wrong row: whatever is drafted, the verification decides them)."""
    tok, ids, expect = plain
    model = ArtifactModel(built[0], draft=True)
    q = len(ids)

    def recent_after(feed) -> torch.Tensor:
        model.reset(1)
        model.forward(torch.tensor([ids]), 0)
        before = model.recent.clone()
        feed()
        assert not torch.equal(model.recent, before)
        return model.recent.clone()
    stepped = recent_after(lambda: [model.forward(torch.tensor([[t]]), q + i) for i, t in enumerate(expect[:2])])
    assert torch.equal(recent_after(lambda: model.verify(expect[:2], q)), stepped)


def _block_end(model, ids: list[int], first: int, fed: bool) -> int:
    """The index of the first token a speculative run draws at the last position of a ratio-4 block (whose
    compressor state shifts there) with the caches holding it (`fed`: right after an accepted draft) or not."""
    model.reset(1)
    model.forward(torch.tensor([ids]), 0)
    spec = Speculative(model, ids, first, NEW)
    return next(i for i, _ in enumerate(spec) if spec.last_fed == fed and (len(ids) + i + 1) % 4 == 0)


@pytest.mark.parametrize("how", ["stop", "cancelled"])
@pytest.mark.parametrize("fed", [True, False], ids=["after-accepted", "after-rejected"])
def test_a_turn_after_a_speculative_answer_continues_as_a_fresh_prefill(built, plain, how, fed):
    """An answer that ends at a ratio-4 block's end, with the caches holding its last token (an accepted
    draft, verified by feeding it) or not (a rejected draft, taken back): `Generation.fed` names what the
    caches hold, so the next turn feeds no position twice (at a block's end that would shift the state twice)."""
    tok, ids, expect = plain
    model = ArtifactModel(built[0], draft=True)
    mtp, full = model.drafter, ids + list(expect)
    model.drafter = KnownDrafts(mtp, full, lambda i: i % 3 != 0, model.config.vocab_size)
    at = _block_end(model, ids, expect[0], fed)
    model.drafter = KnownDrafts(mtp, full, lambda i: i % 3 != 0, model.config.vocab_size)
    model.reset(1)
    if how == "stop":
        if expect[at] in expect[:at]:
            pytest.skip("that token was drawn before")
        done = generate(model, EndsAt(tok, expect[at]), ids, NEW, lambda text: None)
    else:
        asked = itertools.count()                      # once after each token
        done = generate(model, tok, ids, NEW, lambda text: None, cancelled=lambda: next(asked) == at)
    assert len(done.held) == at + fed
    fed_ids = done.fed(ids)
    more = tok.encode(" And then?")
    continued = model.forward(torch.tensor([more]), len(fed_ids))
    fresh = ArtifactModel(built[0], draft=False).forward(torch.tensor([fed_ids + more]), 0)
    assert torch.equal(continued, fresh)


def test_dsv4_run_drafts_only_when_asked(built):
    """Drafting is opt-in (`--draft`): the same greedy answer either way, its drafts reported only with it."""
    from click.testing import CliRunner

    from dsv4.cli import cli
    runs = {flag: CliRunner().invoke(cli, ["run", str(built[0]), "--prompt", PROMPT, "--max-new", "12", *flag])
            for flag in ((), ("--draft",))}
    for result in runs.values():
        assert result.exit_code == 0, result.output
    assert runs[()].stdout == runs[("--draft",)].stdout and runs[()].stdout.strip()
    assert "drafts accepted" in runs[("--draft",)].stderr and "drafts accepted" not in runs[()].stderr





@pytest.mark.parametrize("pattern", [None, lambda i: i % 2 == 0], ids=["own-drafts", "every-other-right"])
def test_the_device_pass_drafts_what_the_host_pass_drafts(built, plain, pattern):
    """Greedy, the device decides each pass itself (runtime/drafted_pass.py), the MTP block drafting inside
    the pass from the one or two positions it settled: the same tokens and, pass by pass, the same drafts as
    the host's loop (which judges on the host and drafts through the block's own calls). With the block's own
    drafts (nearly all rejected on random weights), and with every other draft told right (`KnownDrafts`,
    whose record of what the block drafted covers the accepted passes' two-position drafts)."""
    tok, ids, expect = plain
    runs = {}
    for device in (True, False):
        model = ArtifactModel(built[0], draft=True)
        if not device:
            model.drafted_pass = None
        if pattern is not None:
            model.drafter = KnownDrafts(model.drafter, ids + list(expect), pattern, model.config.vocab_size)
        done = generate(model, tok, ids, NEW, lambda text: None)
        assert done.tokens == expect and done.drafts.drafted > 10
        runs[device] = done.drafts.drafts if pattern is None else (model.drafter.drafted[:done.drafts.drafted],
                                                                    done.drafts.accepted)
    assert runs[True] == runs[False]
    if pattern is not None:
        assert runs[True][1] > 5
