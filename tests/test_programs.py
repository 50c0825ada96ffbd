"""Decode layer programs against the reference layers, one layer kind at a time (bitwise)."""
import pytest
import torch

from builder.checkpoint import Checkpoint
from builder.programs.decode import expert_table, layer_weights, make_program, mtp_logits, new_caches, program_kind
from builder.reference.model import ReferenceModel

MAX_LEN = 320


@pytest.fixture(scope="module")
def setup(tiny_dir):
    ckpt = Checkpoint(tiny_dir)
    return ckpt, ReferenceModel(ckpt, act=torch.float32, max_len=MAX_LEN)


@pytest.fixture(scope="module")
def setup_bf16(tiny_dir):
    ckpt = Checkpoint(tiny_dir)
    return ckpt, ReferenceModel(ckpt, act=torch.bfloat16, max_len=MAX_LEN)


def _copy_reference_caches(block, caches):
    attn = block.attn
    caches["kv"].copy_(attn.kv)
    if attn.compressor is not None:
        caches["comp_kv"].copy_(attn.compressor.kv_state)
        caches["comp_score"].copy_(attn.compressor.score_state)
    if attn.indexer is not None:
        caches["idx_keys"].copy_(attn.indexer.keys)
        caches["idx_kv"].copy_(attn.indexer.compressor.kv_state)
        caches["idx_score"].copy_(attn.indexer.compressor.score_state)


@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("layer", [0, 2, 3, 4], ids=["hash-ratio0", "hash-ratio4-indexer", "ratio128", "ratio4"])
def test_decode_program_equals_reference_layer(request, layer, act):
    """Bitwise, in float32 and in bf16 (there the compressor and gate weights stay in bf16 and
    `dsv4::wide_linear` widens them on the CPU)."""
    ckpt, ref = request.getfixturevalue("setup" if act == torch.float32 else "setup_bf16")
    cfg = ckpt.config
    block = ref.layers[layer]
    program = make_program(cfg, layer, act, MAX_LEN)
    weights = layer_weights(cfg, ckpt.get, layer, act)
    assert weights["ffn.gate.weight"].dtype == (torch.bfloat16 if act == torch.bfloat16 else torch.float64)
    table, keep = expert_table(ckpt.get, cfg, layer)
    ids = torch.randint(0, 900, (1, 140), generator=torch.Generator().manual_seed(layer))
    ref.reset()
    states = {}
    orig = type(block).__call__

    def spy(self, x, start, ids_):
        out = orig(self, x, start, ids_)
        if self is block:
            states[start] = (x[:, -1].clone(), out[:, -1].clone())
        return out
    type(block).__call__ = spy
    try:
        ref.forward(ids[:, :127], 0)                  # prefill: window wrapped, ratio-128 block not yet complete
        caches = new_caches(cfg, layer, 1, MAX_LEN, act)
        _copy_reference_caches(block, caches)
        for p in range(127, 140):                      # completes a ratio-128 block at 127, ratio-4 blocks every 4
            ref.forward(ids[:, p:p + 1], p)
            h_in, h_ref = states[p]
            h = program(h_in, torch.tensor([p]), ids[0, p:p + 1], table, caches, weights)
            assert torch.equal(h, h_ref), f"layer {layer} position {p}: max diff {(h - h_ref).abs().max()}"
        assert torch.equal(caches["kv"], block.attn.kv)
    finally:
        type(block).__call__ = orig


def _program_and_args(ckpt, layer, batch=2):
    cfg = ckpt.config
    program = make_program(cfg, layer, torch.float32, MAX_LEN)
    table, keep = expert_table(ckpt.get, cfg, layer)
    caches = new_caches(cfg, layer, batch, MAX_LEN, torch.float32)
    g = torch.Generator().manual_seed(4)
    args = (torch.randn(batch, cfg.hc_mult, cfg.hidden_size, generator=g), torch.tensor([5, 40]),
            torch.tensor([3, 9]), table)
    return program, args, caches, layer_weights(cfg, ckpt.get, layer, torch.float32), keep


def test_decode_program_exports_with_its_cache_writes(setup):
    """Two sequences at different positions; the exported program writes the same caches as eager."""
    ckpt, _ = setup
    program, args, caches, weights, keep = _program_and_args(ckpt, 2)
    eager_caches = {k: v.clone() for k, v in caches.items()}
    expect = program(*args, eager_caches, weights)
    exported = torch.export.export(program, (*args, {k: v.clone() for k, v in caches.items()}, weights))
    small = {k: v.numel() for k, v in exported.constants.items() if k != "rot"}   # rot: the RoPE table
    assert max(small.values(), default=0) <= 16, f"weights must be inputs, not constants: {small}"   # grids only
    # layer 2 is a hash layer: its gate is inside the MoE's one op (dsv4::route_hash's launch on a GPU), which
    # writes `routed` itself
    assert "dsv4.moe_gate_hc_post.default" in {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    got = exported.module()(*args, caches, weights)
    assert torch.equal(got, expect)
    assert all(torch.equal(caches[k], eager_caches[k]) for k in caches)
    assert caches["kv"].abs().sum() > 0


@pytest.mark.parametrize("layer", [3, 4], ids=["ratio128", "ratio4-indexer"])
def test_decode_program_runs_its_compressors_on_a_side_branch(setup, layer):
    """The compressors' products and steps are ops of one side branch (`dsv4::fork_side`'s token), forked
    before the query path's first GEMV and joined after its last launch, before anything reads what the
    branch wrote (the indexer's picks, the attention), with the branch's inputs held until the join."""
    ckpt, _ = setup
    program, args, caches, weights, keep = _program_and_args(ckpt, layer)
    nodes = [n for n in torch.export.export(program, (*args, caches, weights)).graph.nodes if n.op == "call_function"]
    ops = [str(n.target).removeprefix("dsv4.").removesuffix(".default") for n in nodes]
    first = {op: ops.index(op) for op in set(ops)}
    fork, join = nodes[first["fork_side"]], nodes[first["join_side"]]
    steps = ["compressor_step"] * (2 if layer == 4 else 1)
    assert [op for n, op in zip(nodes, ops) if fork in n.args] == ["wide_linear", *steps, "join_side"]
    assert first["fork_side"] < first["wide_linear"] < first["fp8_linear"] < first["q_heads_kv_row"] \
        < first["join_side"] < first["decode_attention"]
    if layer == 4:
        assert first["join_side"] < first["indexer_picks"]
    x = join.args[1][0]                                             # x itself, or a view of it
    assert torch.ops.dsv4.hc_pre_norm.default in (x.target, getattr(x.args[0], "target", None))
    assert len(join.args[2]) == (3 if layer == 3 else 6)


@pytest.mark.slow
def test_decode_program_runs_from_an_aoti_package(setup, tmp_path):
    ckpt, _ = setup
    program, args, caches, weights, keep = _program_and_args(ckpt, 3)
    eager_caches = {k: v.clone() for k, v in caches.items()}
    expect = program(*args, eager_caches, weights)
    exported = torch.export.export(program, (*args, {k: v.clone() for k, v in caches.items()}, weights))
    package = torch._inductor.aoti_load_package(
        torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp_path / "layer3.pt2")))
    got = package(*args, caches, weights)
    assert torch.nn.functional.cosine_similarity(got.flatten(), expect.flatten(), dim=0) > 0.99999
    assert torch.equal(caches["kv"], eager_caches["kv"])
    # the gate writes its experts into the cache itself (dsv4::route_topk): the package's input, not a copy
    assert torch.equal(caches["routed"], eager_caches["routed"]) and caches["routed"].max() > 0


def test_decode_mtp_program_equals_reference_draft(setup):
    ckpt, ref = setup
    cfg = ckpt.config
    layer = cfg.num_hidden_layers
    program = make_program(cfg, layer, torch.float32, MAX_LEN)
    weights = layer_weights(cfg, ckpt.get, layer, torch.float32)
    mtp = ref.mtp[0]
    table, keep = expert_table(ckpt.get, cfg, layer)
    ids = torch.randint(0, 900, (1, 40), generator=torch.Generator().manual_seed(11))
    ref.reset()
    h = ref.hidden(ids[:, :30], 0)
    mtp.draft(h, 0, ids[:, :30])
    caches = new_caches(cfg, cfg.num_hidden_layers, 1, MAX_LEN, torch.float32)
    _copy_reference_caches(mtp, caches)
    for p in range(30, 40):
        h = ref.hidden(ids[:, p:p + 1], p)
        expect = mtp.draft(h, p, ids[:, p:p + 1])
        got = program(h[:, 0], torch.tensor([p]), ids[0, p:p + 1], table, caches, weights)
        assert torch.equal(mtp_logits(cfg, got[:, None], weights, ckpt.get("head.weight"))[:, 0], expect), f"position {p}"


def test_layers_of_one_kind_share_a_program(setup):
    """Hash layers 0 and 1 share one program; every other kind is distinct (the artifact test runs both)."""
    ckpt, _ = setup
    cfg = ckpt.config
    kinds = [program_kind(cfg, i) for i in range(cfg.num_hidden_layers + cfg.num_nextn_predict_layers)]
    assert kinds[0] == kinds[1] == "layer-ratio0-hash" and kinds[-1].startswith("mtp-")
    assert len(set(kinds)) == len(kinds) - 1


@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_stacked_fp8_linear_gives_each_part_exactly(act):
    """Projections of one input stacked into one FP8 linear (`FUSED_FP8`), a part not a multiple of 128
    rows padded: each part's output equals its own linear's, bit for bit."""
    from builder.programs.decode import linear_fp8, linear_fp8_parts, stack_fp8
    from plugins.formats import fp8_weight_quant
    g = torch.Generator().manual_seed(3)
    parts = [fp8_weight_quant(torch.randn(n, 256, generator=g) * 0.05) for n in (100, 256, 40)]
    x = torch.randn(2, 3, 256, generator=g).to(act)
    w = {f"p{i}.{k}": t for i, part in enumerate(parts) for k, t in zip(("weight", "scale"), part)}
    w["all.weight"], w["all.scale"] = stack_fp8(parts)
    assert w["all.weight"].shape == (128 + 256 + 128, 256) and w["all.scale"].shape == (1 + 2 + 1, 2)
    for i, got in enumerate(linear_fp8_parts(x, w, "all", (100, 256, 40))):
        assert torch.equal(got, linear_fp8(x, w, f"p{i}"))


def test_decode_program_lets_comb_be_finished_beside_its_readers(setup):
    """The decode program's hc_pre ops carry comb_beside (their comb's readers, hc_post_pre_norm and the MoE's
    post, join the side stream first: plugins/hc_pre.py SINKHORN_BESIDE), and the exported program gives the
    eager program's output."""
    ckpt, _ = setup
    program, args, caches, weights, keep = _program_and_args(ckpt, 3)
    eager_caches = {k: v.clone() for k, v in caches.items()}
    expect = program(*args, eager_caches, weights)
    exported = torch.export.export(program, (*args, {k: v.clone() for k, v in caches.items()}, weights))
    flagged = {}
    for n in exported.graph.nodes:                   # the flag by its name in the op's schema
        if str(n.target) in ("dsv4.hc_pre_norm.default", "dsv4.hc_post_pre_norm.default"):
            names = [a.name for a in n.target._schema.arguments]
            flagged[str(n.target)] = dict(zip(names, n.args)) | n.kwargs
    assert {k: v.get("comb_beside") for k, v in flagged.items()} == {"dsv4.hc_pre_norm.default": True,
                                                                      "dsv4.hc_post_pre_norm.default": True}
    assert torch.equal(exported.module()(*args, caches, weights), expect)
