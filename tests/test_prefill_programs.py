"""Prefill layer programs against the reference model's one-shot prefill (float32), chunk by chunk, and the
caches they leave against the decode program's, one layer kind at a time."""
import pytest
import torch

from builder.checkpoint import Checkpoint
from builder.programs.decode import expert_table, layer_weights, make_program, new_caches
from builder.programs.prefill import make_prefill_program
from builder.reference.model import Block, ReferenceModel

MAX_LEN = 320
PROMPT = 150        # window (16) wrapped many times, a ratio-128 block completed at 127, the next one open
STEPS = 4           # decode steps after the prompt; position 151 completes a ratio-4 block
MTP = 5             # the tiny model's MTP block (layers 0-4, then mtp.0)
# (chunk, tokens per call for each of two sequences): the sequences sit at different positions in every call
SCHEDULES = [
    pytest.param(24, [[24] * 6 + [6], [6] + [24] * 6], id="chunk24-over-window"),
    pytest.param(7, [[7] * 21 + [3], [3] + [7] * 21], id="chunk7-unaligned"),
]
LAYERS = [pytest.param(0, id="ratio0-hash"), pytest.param(2, id="ratio4-hash-indexer"),
          pytest.param(3, id="ratio128"), pytest.param(4, id="ratio4-indexer"), pytest.param(MTP, id="mtp")]
# max |diff| / max |reference|; measured: 0 for every layer output
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """Two prompts prefilled at once by the reference, then decoded; every block's inputs and outputs."""
    ckpt = Checkpoint(tiny_dir)
    ref = ReferenceModel(ckpt, act=torch.float32, max_len=MAX_LEN)
    blocks = {id(b): i for i, b in enumerate(ref.layers + ref.mtp)}
    seen: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    orig = Block.__call__

    def spy(self, x, start, ids_):
        out = orig(self, x, start, ids_)
        seen[blocks[id(self)], start] = (x.clone(), out.clone())
        return out
    ids = torch.randint(0, 900, (2, PROMPT + STEPS), generator=torch.Generator().manual_seed(7))
    ref.reset(batch=2)
    mtp, hidden = ref.mtp[0], {}
    Block.__call__ = spy
    try:
        for start, end in [(0, PROMPT)] + [(p, p + 1) for p in range(PROMPT, PROMPT + STEPS)]:
            hidden[start] = ref.hidden(ids[:, start:end], start)
            mtp.draft(hidden[start], start, ids[:, start:end])
    finally:
        Block.__call__ = orig
    return ckpt, ids, seen, hidden


def _io(reference, layer, start):
    """What the program of `layer` takes (streams: the main model's last for the MTP block) and gives at
    `start` in the reference run."""
    seen, hidden = reference[2:]
    if layer == MTP:
        return hidden[start], seen[MTP, start][1]
    return seen[layer, start]


@pytest.fixture(scope="module")
def stepped(reference):
    """layer -> the caches the decode program leaves after the prompt fed one token per step (made once)."""
    made: dict[int, dict[str, torch.Tensor]] = {}

    def caches_of(layer):
        if layer not in made:
            ckpt, ids = reference[:2]
            cfg = ckpt.config
            decode = make_program(cfg, layer, torch.float32, MAX_LEN)
            weights = layer_weights(cfg, ckpt.get, layer, torch.float32)
            table, _keep = expert_table(ckpt.get, cfg, layer)
            made[layer] = new_caches(cfg, layer, 2, MAX_LEN, torch.float32)
            x_in = _io(reference, layer, 0)[0]
            for p in range(PROMPT):
                decode(x_in[:, p], torch.tensor([p, p]), ids[:, p], table, made[layer], weights)
        return made[layer]
    return caches_of


def _chunk(t, start, n, size, fill):
    """Rows start[b]..start[b]+n[b] of t [B, S, ...] per sequence, padded to `size` rows with `fill`'s."""
    out = fill.clone()
    for b in range(t.size(0)):
        out[b, :n[b]] = t[b, start[b]:start[b] + n[b]]
    return out


def _rel(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("chunk,schedule", SCHEDULES)
def test_prefill_program_equals_reference_then_decode_continues(reference, stepped, layer, chunk, schedule):
    ckpt, ids = reference[:2]
    cfg = ckpt.config
    program = make_prefill_program(cfg, layer, torch.float32, MAX_LEN, chunk)
    weights = layer_weights(cfg, ckpt.get, layer, torch.float32)
    table, _keep = expert_table(ckpt.get, cfg, layer)
    caches = new_caches(cfg, layer, 2, MAX_LEN, torch.float32)
    x_in, want = _io(reference, layer, 0)
    g = torch.Generator().manual_seed(layer)
    worst = 0.0
    start = torch.zeros(2, dtype=torch.int64)
    for n in zip(*schedule):
        n = torch.tensor(n)
        junk = 100 * torch.randn(2, chunk, *x_in.shape[2:], generator=g)       # padding must change nothing
        h = _chunk(x_in, start, n, chunk, junk)
        tok = _chunk(ids, start, n, chunk, torch.randint(0, 900, (2, chunk), generator=g))
        got = program(h, start, n, tok, table, caches, weights)
        for b in range(2):
            worst = max(worst, _rel(got[b, :n[b]], want[b, start[b]:start[b] + n[b]]))
        start = start + n
    assert worst <= TOLERANCE, f"prefill: max |diff| / max |ref| = {worst:.3g}"
    expect = stepped(layer)
    for k, t in caches.items():     # stale slots of the partial blocks included
        if t.dtype == torch.float64:    # compressor states: a batched projection rounds the last float64 bit
            torch.testing.assert_close(t, expect[k], rtol=1e-12, atol=1e-12, msg=lambda m, k=k: f"{k}: {m}")
        else:
            assert torch.equal(t, expect[k]), f"{k} differs from the decode program's after the prompt"
    decode = make_program(cfg, layer, torch.float32, MAX_LEN)
    for p in range(PROMPT, PROMPT + STEPS):
        x_in, want = _io(reference, layer, p)
        got = decode(x_in[:, 0], torch.tensor([p, p]), ids[:, p], table, caches, weights)
        rel = _rel(got, want[:, 0])
        assert rel <= TOLERANCE, f"decode at {p} after prefill: max |diff| / max |ref| = {rel:.3g}"


@pytest.mark.parametrize("layer", [pytest.param(4, id="ratio4-indexer"), pytest.param(3, id="ratio128")])
def test_prefill_program_exports_with_its_cache_writes(reference, layer):
    """torch.export traces the program (weights as inputs); the exported graph writes the same caches."""
    ckpt = reference[0]
    cfg = ckpt.config
    program = make_prefill_program(cfg, layer, torch.float32, MAX_LEN, 7)
    table, _keep = expert_table(ckpt.get, cfg, layer)
    weights = layer_weights(cfg, ckpt.get, layer, torch.float32)
    g = torch.Generator().manual_seed(5)
    caches = new_caches(cfg, layer, 2, MAX_LEN, torch.float32)
    for k in ("kv", "comp_kv", "comp_score"):       # as if the sequences had come this far
        caches[k].normal_(generator=g)
    args = (torch.randn(2, 7, cfg.hc_mult, cfg.hidden_size, generator=g), torch.tensor([126, 41]),
            torch.tensor([7, 3]), torch.randint(0, 900, (2, 7), generator=g), table)
    eager_caches = {k: v.clone() for k, v in caches.items()}
    expect = program(*args, eager_caches, weights)
    exported = torch.export.export(program, (*args, {k: v.clone() for k, v in caches.items()}, weights))
    small = {k: v.numel() for k, v in exported.constants.items() if k != "rot"}   # rot: the RoPE table
    assert max(small.values(), default=0) <= 16, f"weights must be inputs, not constants: {small}"
    got = exported.module()(*args, caches, weights)
    assert torch.equal(got, expect)
    assert all(torch.equal(caches[k], eager_caches[k]) for k in caches)
    args = (args[0], torch.tensor([0, 250]), torch.tensor([2, 7]), *args[3:])   # one graph serves every start
    assert torch.equal(exported.module()(*args, caches, weights), program(*args, eager_caches, weights))
    assert all(torch.equal(caches[k], eager_caches[k]) for k in caches)


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [pytest.param(0, id="decode"), pytest.param(8, id="prefill-chunk8")])
def test_ratio4_programs_compile_with_cat_lowered_as_on_cuda(tiny_dir, tmp_path, chunk):
    """Inductor lowers `cat` into a pointwise kernel on CUDA (never on CPU), and torch 2.11 then failed on the
    ratio-4 compressor's timeline ("The argument '((-4)) + 4' is not comparable"): the H200 build of session 4
    died on it. Forcing that lowering here shows the failure on a CPU machine (measured: the old program
    fails with torch 2.13 too), so a `cat` that would break a GPU build fails CI first."""
    from builder.build import _compile_program
    ckpt = Checkpoint(tiny_dir)
    cfg = ckpt.config
    layer = 4                                       # ratio 4 with the indexer
    with torch._inductor.config.patch(force_pointwise_cat=True):
        _compile_program(cfg, layer, layer_weights(cfg, ckpt.get, layer, torch.float32), torch.float32, MAX_LEN, 1,
                         "cpu", tmp_path / "program.pt2", chunk)
    assert (tmp_path / "program.pt2").stat().st_size > 0
