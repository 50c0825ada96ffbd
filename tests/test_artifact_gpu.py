"""The tiny model built with aoti for CUDA (recipes/tiny-h200.toml) and run from its artifact on the GPU.

float32 is the exact gate of the compiled chain (fp64 accumulation, the ops' oracles): it must equal the
reference. bfloat16 runs DeepSeek's numerics through the kernels, where one-ulp roundings flip FP8
codes, amplified by random weights (see the README): there it must follow the reference closely."""
import dataclasses
from pathlib import Path

import pytest
import torch

from builder.build import build
from builder.checkpoint import Checkpoint
from builder.forced import TokenByToken, forced_logits
from builder.programs.decode import make_program
from builder.recipe import load_recipe
from builder.reference.model import ReferenceModel
from runtime.artifact import ArtifactModel

from helpers import TINY_FORCED as FORCED, TINY_PROMPT as PROMPT, KnownDrafts, count_bucket_runs, greedy_both_ways

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny-h200.toml"

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def artifact(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "tiny-h200"
    build(load_recipe(RECIPE), tiny_dir, out)
    return out


@pytest.fixture(scope="module")
def artifact_fp32(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "tiny-h200-fp32"
    build(dataclasses.replace(load_recipe(RECIPE), dtype="float32"), tiny_dir, out)
    return out


def _cosines(a, b):
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def test_cuda_float32_artifact_equals_the_reference(artifact_fp32, tiny_dir):
    model = ArtifactModel(artifact_fp32, "cuda", graphs=True)     # as `dsv4 forced` opens it
    assert model.graph is None                                     # oracles: not captured
    got = forced_logits(model, PROMPT, FORCED)
    ref = forced_logits(ReferenceModel(Checkpoint(tiny_dir), device="cuda", act=torch.float32, max_len=200),
                        PROMPT, FORCED)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    assert _cosines(got, ref).min() >= 0.999999, (got - ref).abs().max()


def test_a_short_prompt_goes_through_the_small_prefill_programs(artifact, artifact_fp32, tiny_dir):
    """The recipe's 8-token prefill programs on the GPU (the ops' oracles in float32, the kernels in
    bfloat16, at 8 rows where the 64-token programs never run them): a 5-token prompt through them equals
    the reference in float32, and follows it in bfloat16 as the 64-token programs do."""
    short = PROMPT[:5]
    for art, act in ((artifact_fp32, torch.float32), (artifact, torch.bfloat16)):
        model = ArtifactModel(art, "cuda", graphs=False)
        assert list(model.prefill_buckets) == [8]         # a draft's verification: programs of its own
        ran = count_bucket_runs(model, 8)
        got = forced_logits(model, short, FORCED)
        assert len(ran) == len(model.layers)
        ref = ReferenceModel(Checkpoint(tiny_dir), device="cuda", act=act, max_len=200)
        if act == torch.float32:
            want = forced_logits(ref, short, FORCED)
            assert torch.equal(got.argmax(-1), want.argmax(-1)) and _cosines(got, want).min() >= 0.999999
        else:
            want = forced_logits(TokenByToken(ref), short, FORCED)
            assert _cosines(got, want).min() >= 0.99
            assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 6 / 7


def test_prefill_chunks_replayed_as_cuda_graphs_give_the_same_bits(artifact):
    """Every prefill size is captured as a CUDA graph at load: the 8-token bucket (the ops' decode kernels)
    and the 64-token chunk (prefill kernels; on sm_90 the warpgroup-MMA MoE). A 5-token prompt and the
    140-token one (two whole chunks, then a tail padded to 64) then prefill by replays, to the bits of their
    plain launches."""
    graphed = ArtifactModel(artifact, "cuda", graphs=True)
    assert list(graphed.prefill_graphs) == [8, 64]        # drafts verify on programs of their own (no 2-token size)
    plain = ArtifactModel(artifact, "cuda", graphs=False)
    for prompt in (PROMPT[:5], PROMPT):
        assert torch.equal(forced_logits(graphed, prompt, FORCED), forced_logits(plain, prompt, FORCED))


def test_a_prefill_chunk_on_the_grouped_moe_kernels_is_captured_too(artifact, monkeypatch):
    """With the grouped MoE kernels (the prefill MoE of GPUs other than sm_90, which take their group count
    from the group table's kernel, not the host) the 64-token chunk is captured as well, without a warning,
    and its replays give the bits of a model loaded without graphs."""
    import warnings
    from plugins import moe_experts
    monkeypatch.setattr(moe_experts, "WGMMA", moe_experts.WgmmaPaths(decode=False, prefill=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graphed = ArtifactModel(artifact, "cuda", graphs=True)
    assert not [w for w in caught if "CUDA graph" in str(w.message)]
    assert list(graphed.prefill_graphs) == [8, 64]        # drafts verify on programs of their own (no 2-token size)
    plain = ArtifactModel(artifact, "cuda", graphs=False)
    assert torch.equal(forced_logits(graphed, PROMPT, FORCED), forced_logits(plain, PROMPT, FORCED))


@pytest.mark.parametrize("wgmma", [
    pytest.param("", id="mma"), pytest.param("decode", id="wgmma-decode"),
    # off by default while it fails this line (session 24: 0.9709), which bf16-unit noise in the prefill MoE
    # reaches on this model (bench/tiny_moe_noise.py); test_kernels_moe_wgmma.py judges it on this model's
    # own MoE inputs instead
    pytest.param("prefill", id="wgmma-prefill", marks=pytest.mark.xfail(
        reason="bf16-unit noise in the prefill MoE flips this model's routing: plugins.moe_experts.WgmmaPaths",
        strict=False))])
def test_cuda_bfloat16_artifact_follows_the_reference(artifact, tiny_dir, wgmma, monkeypatch):
    """Also the model-level check of the sm_90 warpgroup-MMA MoE paths, one at a time (where the GPU has
    them): plugins.moe_experts.WgmmaPaths; "mma" runs the mma.sync and grouped kernels alone."""
    from plugins import moe_experts
    monkeypatch.setattr(moe_experts, "WGMMA", moe_experts.WgmmaPaths(decode=False, prefill=False))
    if wgmma:
        if torch.cuda.get_device_capability() != (9, 0):
            pytest.skip("the wgmma MoE kernels need an sm_90 GPU")
        monkeypatch.setattr(moe_experts.WGMMA, wgmma, True)
    model = ArtifactModel(artifact, "cuda", graphs=True)
    assert model.graph is not None
    got = forced_logits(model, PROMPT, FORCED)
    ref = ReferenceModel(Checkpoint(tiny_dir), device="cuda", act=torch.bfloat16, max_len=200)
    prefill = forced_logits(ref, PROMPT, FORCED)
    decode = forced_logits(TokenByToken(ref), PROMPT, FORCED)      # fed as the artifact is
    print(f"bf16 worst cosine: artifact vs reference decode {_cosines(got, decode).min():.6f}, vs prefill "
          f"{_cosines(got, prefill).min():.6f}; reference decode vs prefill {_cosines(prefill, decode).min():.6f}")
    # on CPU (oracles, no kernels) the same comparison measured 0.9969 worst, the reference against
    # itself 0.971: bf16 on random weights is this noisy; the exact gate is the float32 test above
    assert _cosines(got, decode).min() >= 0.99
    assert (got.argmax(-1) == decode.argmax(-1)).float().mean() >= 6 / 7


def test_graph_replay_equals_plain_launches_and_eager(artifact, tiny_dir):
    graphed = forced_logits(ArtifactModel(artifact, "cuda", graphs=True), PROMPT, FORCED)
    plain = forced_logits(ArtifactModel(artifact, "cuda", graphs=False), PROMPT, FORCED)
    assert torch.equal(graphed, plain)
    cfg = Checkpoint(tiny_dir).config
    eager = forced_logits(ArtifactModel(artifact, "cuda", programs=lambda layer: make_program(
        cfg, layer, torch.bfloat16, 1024)), PROMPT, FORCED)
    # Inductor's fused bf16 kernels round differently from eager's op-by-op ones: measured worst 0.9978 on
    # the H200, the reference's own decode-vs-prefill gap being 0.9973 (exactness is the float32 test's job)
    assert _cosines(graphed, eager).min() >= 0.99


@pytest.mark.parametrize("sinkhorn_beside", [pytest.param(False, id="compressors"),
                                             pytest.param(True, id="compressors-and-sinkhorn")])
def test_the_side_branches_change_no_bit(artifact, monkeypatch, sinkhorn_beside):
    """The compressors on a second stream beside the query path (`dsv4::fork_side`, plugins/streams.py), and
    comb's Sinkhorn iterations beside the chain (plugins.hc_pre.SINKHORN_BESIDE): the same logits as in
    line, from the captured graph and from plain launches, in decode steps and in the verification of drafts
    (the tokens two at a time)."""
    from plugins import hc_pre, streams
    monkeypatch.setattr(streams, "SIDE_BRANCHES", False)
    in_line = forced_logits(ArtifactModel(artifact, "cuda", graphs=True), PROMPT, FORCED)
    pairs_in_line = forced_logits(ArtifactModel(artifact, "cuda", graphs=True, draft=True), PROMPT, FORCED,
                                  paired=True)
    monkeypatch.setattr(streams, "SIDE_BRANCHES", True)
    monkeypatch.setattr(hc_pre, "SINKHORN_BESIDE", sinkhorn_beside)
    for graphs in (True, False):
        assert torch.equal(forced_logits(ArtifactModel(artifact, "cuda", graphs=graphs), PROMPT, FORCED), in_line)
        assert torch.equal(forced_logits(ArtifactModel(artifact, "cuda", graphs=graphs, draft=True), PROMPT, FORCED,
                                         paired=True), pairs_in_line)


def test_greedy_decode_ahead_of_the_host_equals_step_by_step_on_the_graph(artifact):
    """The captured step picks each token on the GPU and the next replay is queued before the host reads
    it: the same tokens as replaying one step at a time with each argmax read back."""
    expect, early, greedy = greedy_both_ways(ArtifactModel(artifact, "cuda", graphs=True), PROMPT, 12)
    assert early == expect[1:5] and greedy == expect


def test_paged_experts_change_nothing_but_where_they_are_read(artifact):
    """20 device slots for 80 experts, the rest read from pinned host memory, inside the captured graph
    (route predictions and prefetch copies racing the replay): the same logits as every expert resident,
    with hits, misses, prefetches and predictions counted."""
    resident = forced_logits(ArtifactModel(artifact, "cuda", graphs=True, expert_slots=0), PROMPT, FORCED)
    model = ArtifactModel(artifact, "cuda", graphs=True, expert_slots=20)
    paged = forced_logits(model, PROMPT, FORCED)
    assert torch.equal(paged, resident)
    stats = model.pager.stats
    assert stats.hits + stats.misses == len(FORCED) * 5 * 6         # decode steps (the prompt is prefilled)
    assert stats.prefetch_hits > 0 and model.pager.bytes_moved > 0
    assert model.pager.device_bytes() == 20 * model.pager.stride
    # the score-routed layers' predictions reached the host from inside the graph, and name used experts
    assert stats.predicted == len(FORCED) * 2 * 6 and stats.predicted_used > 0


def test_an_h200_keeps_cold_experts_pinned():
    """PCIe GPUs read pageable memory, if at all, through software faults: the cold copies are pinned there
    (a GB10 or GH200 would keep them in the mapped bank instead: not reachable here)."""
    from runtime.expert_pager import reads_pageable_memory
    assert not reads_pageable_memory(torch.device("cuda"))


def test_the_server_replays_the_graphs_from_its_worker_thread(artifact):
    """`dsv4 serve` generates on a worker thread: on the GPU its replayed graphs (decode and prefill) give the
    answer the same model gives from this thread, for a conversation's first turn and for its next turn fed
    from the caches, and a conversation put aside comes back from pinned host memory."""
    TestClient = pytest.importorskip("fastapi.testclient").TestClient      # the serve extra

    from runtime.chat import Message, render
    from runtime.generate import Conversation
    from runtime.server import Engine, make_app
    from runtime.tokenizer import Tokenizer
    tok = Tokenizer(artifact)
    model = ArtifactModel(artifact, "cuda", graphs=True)
    assert model.graph is not None and model.prefill_graphs
    turns = [("Hello there", "Go on"), ("A title, please", None)]
    here, answers = Conversation(model, tok, keep=1), []
    for first, _ in turns:                                            # this thread: both first turns
        pieces = []
        here.generate(render([Message("user", first)]), 8, pieces.append)
        answers.append("".join(pieces))
    follow = [Message("user", "Hello there"), Message("assistant", answers[0]), Message("user", "Go on")]
    pieces = []
    cached_here = here.generate(render(follow), 8, pieces.append).cached   # back to the first, from host memory
    assert cached_here > 0
    with TestClient(make_app(Engine(model, tok, keep=1), "tiny")) as client:
        def ask(messages):
            body = client.post("/v1/chat/completions", json={"messages": messages, "temperature": 0,
                                                               "max_tokens": 8}).json()
            return body["choices"][0]["message"]["content"], body["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert ask([{"role": "user", "content": "Hello there"}]) == (answers[0], 0)
        assert ask([{"role": "user", "content": "A title, please"}]) == (answers[1], 0)
        got, cached = ask([{"role": m.role, "content": m.content} for m in follow])
        assert (got, cached) == ("".join(pieces), cached_here)


def test_speculative_decoding_replays_its_verification_graph(artifact):
    """The drafts' two-token verification, the MTP block's drafts of one and two positions and of its window (a
    turn's fill) and greedy's pass decided on the device are captured as CUDA graphs of their own at load: replayed, they give the tokens their
    programs give launched plainly (the same kernels), with drafts made and verified, accepted ones among them
    (`KnownDrafts`)."""
    from runtime.generate import generate
    from runtime.tokenizer import Tokenizer
    tok = Tokenizer(artifact)
    graphed = ArtifactModel(artifact, "cuda", graphs=True, draft=True)
    assert graphed.drafter is not None and graphed.verify_graph is not None
    assert set(graphed.drafter.graphs) == {1, 2, graphed.config.sliding_window}     # each pass's, a turn's fill
    passes = graphed.drafted_pass                          # greedy: the device's pass (runtime/drafted_pass.py),
    assert set(passes.graphs) == set(passes.forms()) == {True, False}     # with and without the states put back
    plain = ArtifactModel(artifact, "cuda", graphs=False, draft=True)
    replayed = generate(graphed, tok, PROMPT[:40], 24, lambda text: None)
    launched = generate(plain, tok, PROMPT[:40], 24, lambda text: None)
    assert replayed.tokens == launched.tokens and replayed.drafts.drafted > 0
    answer = PROMPT[:40] + list(replayed.tokens)
    runs = []
    for model in (graphed, plain):
        model.reset(1)
        model.drafter = KnownDrafts(model.drafter, answer, lambda n: n % 3 != 0, model.config.vocab_size)
        runs.append(generate(model, tok, PROMPT[:40], 24, lambda text: None))
    assert runs[0].tokens == runs[1].tokens and runs[0].drafts.accepted == runs[1].drafts.accepted > 0


def test_forced_pairs_through_the_verification_give_the_decode_steps_rows(artifact, artifact_fp32):
    """`dsv4 forced --pairs`: the forced tokens two at a time through the verification programs (on the
    graph, as speculative decoding runs them) against one decode step each. float32 (the ops' oracles): bit
    for bit. bfloat16 (the kernels, two rows where a step has one): the same argmax and cosine >= 0.9999."""
    exact = ArtifactModel(artifact_fp32, "cuda", graphs=True, draft=True)
    assert exact.verify_decode
    assert torch.equal(forced_logits(exact, PROMPT, FORCED, paired=True), forced_logits(exact, PROMPT, FORCED))
    model = ArtifactModel(artifact, "cuda", graphs=True, draft=True)
    assert model.verify_graph is not None
    paired, steps = forced_logits(model, PROMPT, FORCED, paired=True), forced_logits(model, PROMPT, FORCED)
    assert torch.equal(paired.argmax(-1), steps.argmax(-1))
    assert _cosines(paired, steps).min() >= 0.9999, (paired - steps).abs().max()
