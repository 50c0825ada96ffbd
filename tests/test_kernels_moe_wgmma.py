"""The wgmma prefill MoE (csrc/moe_wgmma.cu, sm_90 only) against the oracle and the grouped kernels."""
import pytest
import torch

from helpers import TINY_PROMPT, expert_tensors, random_experts, routed_chunk, split_table
from plugins.formats import mxfp4_dequant, mxfp4_quant
from plugins.ops import moe_routed_oracle


def _bank(n_exp, d, f, tiny_block):
    """Random experts; with `tiny_block`, one 32-K block of some rows 2^-12 smaller than the rest of its
    128 K, beyond what folds exactly into e4m3 (rounded there)."""
    bank = random_experts(n_exp, d, f)
    if tiny_block:
        g = torch.Generator().manual_seed(5)
        w = torch.randn(f, d, generator=g) / d ** 0.5
        w[::7, 32:64] *= 2.0 ** -12
        bank[0] = (*mxfp4_quant(w), *bank[0][2:])
    return bank


@pytest.mark.gpu
@pytest.mark.parametrize("tokens, d, f, k, hot, tiny_block",
                         [(40, 512, 256, 6, False, False), (300, 4096, 2048, 6, True, False),
                          (23, 768, 640, 3, False, False), (64, 1024, 512, 6, False, True),
                          (50, 256, 128, 6, False, False)],
                         ids=["40tok", "flash-300tok-hot", "odd-sizes-k3", "scale-spread-beyond-8",
                              "tiny-model-one-k-step"])
@pytest.mark.parametrize("group", [128, 64])
def test_moe_prefill_wgmma_matches_oracle_and_the_grouped_kernels(tokens, d, f, k, hot, tiny_block, group):
    from plugins.moe_experts import moe_experts_prefill, moe_experts_prefill_wgmma, wgmma_fits
    if not wgmma_fits(torch.empty(1, device="cuda"), d, f):
        pytest.skip("wgmma kernels are built for sm_90a only")
    n_exp = 12
    bank = _bank(n_exp, d, f, tiny_block)
    table, _stores = split_table(bank)
    # every token on expert 4, or on expert 0 whose tiny block is then read by every group
    x, experts, weights = routed_chunk(tokens, d, n_exp, k, hot_expert=4 if hot else 0 if tiny_block else None)
    got = moe_experts_prefill_wgmma(x, experts, weights, table, f, limit=10.0, group=group)
    dequantised = [tuple(mxfp4_dequant(*e[i:i + 2]) for i in (0, 2, 4)) for e in bank]
    expect = moe_routed_oracle(x, experts, weights, dequantised.__getitem__, 10.0)
    # The FP8 MMA adds in less than float32 within 128 K: a gate or up value may land a bf16 unit away from
    # the oracle's, and h's e4m3 requantisation can turn that into a code step of one element (see
    # csrc/moe_wgmma.cu). So: 0.9999 over the whole output, and every token within 0.9995.
    for other in (expect, moe_experts_prefill(x, experts, weights, table, f, limit=10.0)):
        whole = torch.nn.functional.cosine_similarity(got.double().flatten(), other.double().flatten(), dim=0)
        per_token = torch.nn.functional.cosine_similarity(got.double(), other.double(), dim=-1)
        assert whole >= 0.9999 and per_token.min() >= 0.9995, (whole, per_token.min())
        assert torch.allclose(got, other, rtol=0.02, atol=0.02 * other.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("tokens, hot", [(300, True), (700, False)], ids=["flash-300tok-hot", "flash-700tok"])
def test_moe_prefill_wgmma_groups_of_64_give_the_bits_of_groups_of_128(tokens, hot):
    """The two kernel sizes (csrc/moe_wgmma.cu Shape) cut an expert's pairs into other groups, and a pair's
    products do not depend on its group's other columns: the same output bits. The 64-pair kernels run two
    CTAs an SM, the reason they exist."""
    from plugins.loader import kernels
    from plugins.moe_experts import WGMMA_THREADS, moe_experts_prefill_wgmma, wgmma_fits, wgmma_shared_bytes
    d, f, n_exp = 4096, 2048, 12
    if not wgmma_fits(torch.empty(1, device="cuda"), d, f):
        pytest.skip("wgmma kernels are built for sm_90a only")
    table, _stores = split_table(_bank(n_exp, d, f, False))
    x, experts, weights = routed_chunk(tokens, d, n_exp, 6, hot_expert=4 if hot else None)
    big = moe_experts_prefill_wgmma(x, experts, weights, table, f, limit=10.0, group=128)
    small = moe_experts_prefill_wgmma(x, experts, weights, table, f, limit=10.0, group=64)
    assert torch.equal(big, small)
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    for name in ("dsv4_moe_gate_up_wgmma_g64", "dsv4_moe_down_wgmma_g64"):   # CTAs resident on the whole GPU
        assert kernels().resident(name, WGMMA_THREADS, wgmma_shared_bytes(64)) == 2 * sms, name


@pytest.mark.gpu
@pytest.mark.parametrize("wgmma", [True, False], ids=["wgmma", "grouped"])
def test_moe_routed_prefill_captures_in_a_cuda_graph(wgmma, monkeypatch):
    """`dsv4::moe_routed` past DECODE_ROWS rows takes prefill kernels, the wgmma ones on sm_90 or the grouped
    ones (every other GPU), whose group table and count come from a kernel (no host read), so the runtime
    captures whole prefill chunks: the replay gives the bits of a plain call, and new inputs copied in give
    their own plain call's bits."""
    from plugins import moe_experts
    from plugins.moe_experts import wgmma_fits, wgmma_pays
    d, f, n_exp, tokens = 1024, 512, 12, 200
    if wgmma and not wgmma_fits(torch.empty(1, device="cuda"), d, f):
        pytest.skip("wgmma kernels are built for sm_90a only")
    if not wgmma:
        monkeypatch.setattr(moe_experts, "WGMMA", moe_experts.WgmmaPaths(prefill=False))
    table, _stores = split_table(_bank(n_exp, d, f, False))
    x, experts, weights = routed_chunk(tokens, d, n_exp, 6)
    assert wgmma_pays(x, experts, n_exp, f) == wgmma
    call = lambda: torch.ops.dsv4.moe_routed(x, experts, weights, table, f, 10.0)  # noqa: E731
    plain = call()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()                                   # warm-up outside the capture (allocator pools)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    graph.replay()
    assert torch.equal(out, plain)
    x2, experts2, weights2 = routed_chunk(tokens, d, n_exp, 6, hot_expert=4, seed=1)   # other groups
    want = torch.ops.dsv4.moe_routed(x2, experts2, weights2, table, f, 10.0)
    x.copy_(x2), experts.copy_(experts2), weights.copy_(weights2)
    graph.replay()
    assert torch.equal(out, want) and not torch.equal(want, plain)


@pytest.mark.gpu
def test_act_quant_in_mma_slot_order_moves_each_blocks_words():
    """act_quant's `mma_slots` (the prefill MoE kernels' B order, csrc/moe_wgmma.cu): word w of each 128-K
    block holds the plain codes' word 8 (w % 4) + 2 (w / 8) + (w / 4) % 2; the scales are unchanged."""
    from plugins.fp8_linear import act_quant, make_workspace
    x = torch.randn(5, 512, device="cuda").to(torch.bfloat16)
    plain, slots = make_workspace(5, 512, "cuda"), make_workspace(5, 512, "cuda")
    act_quant(x, *plain)
    act_quant(x, *slots, mma_slots=True)
    w = torch.arange(32, device="cuda")
    source = 8 * (w % 4) + 2 * (w // 8) + (w // 4) % 2
    assert torch.equal(slots[1], plain[1])
    assert torch.equal(slots[0].view(5, 4, 32, 4), plain[0].view(5, 4, 32, 4)[:, :, source])


@pytest.mark.gpu
@pytest.mark.parametrize("tokens, n_exp, k, max_group", [(300, 12, 6, 128), (4096, 256, 6, 128), (37, 10, 6, 8)],
                         ids=["300tok-hot", "flash-4096tok", "small-groups"])
def test_group_table_kernel_equals_its_torch_form(tokens, n_exp, k, max_group):
    """csrc/moe_groups.cu against group_pairs' torch form (its oracle), padding slots and group count included."""
    from plugins.moe_experts import group_pairs
    g = torch.Generator().manual_seed(7)
    experts = torch.stack([torch.randperm(n_exp, generator=g)[:k] for _ in range(tokens)]).to(torch.int32)
    experts[: tokens // 2, 0] = 3                        # a hot expert: several groups
    expect = group_pairs(experts, n_exp, max_group)
    got = group_pairs(experts.cuda(), n_exp, max_group)
    assert len(got) == len(expect) == 5
    for a, b in zip(got, expect):
        assert torch.equal(a.cpu(), b)


def tiny_prefill_moe_inputs(tiny_dir, device: str, chunk: int = 64):
    """Every prefill MoE call of the tiny bf16 reference on tests/test_artifact_gpu.py's prompt, cut into the
    artifact's prefill chunks (those over 16 tokens, which dsv4::moe_routed sends to a prefill path): a list
    of (x, experts int32, route weights float32, expert_weights, table, limit), the table [experts] int64
    pointing into `stores` (the layer's packed experts on `device`), and the model's intermediate size."""
    import builder.reference.moe as reference_moe
    from builder.checkpoint import Checkpoint
    from builder.reference.model import ReferenceModel
    from plugins.moe_experts import pack_expert
    calls, real = [], reference_moe.moe_routed_oracle

    def spy(x, experts, weights, expert_weights, limit):
        calls.append((x, experts, weights, expert_weights, limit))
        return real(x, experts, weights, expert_weights, limit)

    reference_moe.moe_routed_oracle = spy
    try:
        ckpt = Checkpoint(tiny_dir)
        ref = ReferenceModel(ckpt, device=device, act=torch.bfloat16, max_len=200)
        ref.reset(1)
        ref.forward(torch.tensor([TINY_PROMPT]), 0)
    finally:
        reference_moe.moe_routed_oracle = real
    out, stores = [], []
    for x, experts, weights, expert_weights, limit in calls:
        moe = expert_weights.__self__
        layer = [pack_expert(*expert_tensors(ckpt, f"{moe.prefix}experts.{e}.")).to(device)
                 for e in range(ckpt.config.n_routed_experts)]
        stores += layer
        table = torch.tensor([s.data_ptr() for s in layer], dtype=torch.int64, device=device)
        for c in range(0, x.size(0), chunk):
            if x[c:c + chunk].size(0) > 16:
                out.append((x[c:c + chunk], experts[c:c + chunk].to(torch.int32).contiguous(),
                            weights[c:c + chunk].float().contiguous(), expert_weights, table, limit))
    return out, stores, ckpt.config.moe_intermediate_size


@pytest.mark.gpu
def test_moe_prefill_wgmma_on_the_tiny_models_own_inputs(tiny_dir):
    """The model-level check without the model's amplification: the wgmma prefill MoE on the inputs the tiny
    bf16 model gives it (every layer, the artifact test's prompt in 64-token chunks) against the oracle, with
    the kernel tests' bounds. tests/test_artifact_gpu.py cannot judge this kernel on that model: bf16-unit
    noise in the prefill MoE's output alone flips its routing (bench/tiny_moe_noise.py); a fault would show
    here."""
    from plugins.moe_experts import moe_experts_prefill_wgmma, wgmma_fits
    if not wgmma_fits(torch.empty(1, device="cuda"), 256, 128):
        pytest.skip("wgmma kernels are built for sm_90a only")
    calls, _stores, f = tiny_prefill_moe_inputs(tiny_dir, "cuda")
    assert len(calls) == 10                      # 5 MoE layers x 2 chunks of 64 (the MTP block not run)
    for x, experts, weights, expert_weights, table, limit in calls:
        got = moe_experts_prefill_wgmma(x.contiguous(), experts, weights, table, f, limit)
        expect = moe_routed_oracle(x, experts, weights, expert_weights, limit)
        whole = torch.nn.functional.cosine_similarity(got.double().flatten(), expect.double().flatten(), dim=0)
        per_token = torch.nn.functional.cosine_similarity(got.double(), expect.double(), dim=-1)
        assert whole >= 0.9999 and per_token.min() >= 0.9995, (whole, per_token.min())


def test_prefill_kernel_size_follows_the_chunks_pairs_per_expert_and_two_small_ctas_fit_an_sm():
    """wgmma_group: groups of 64 pairs up to WGMMA.prefill_small_groups_up_to pairs per expert on average
    (Flash: 2048 tokens x 6 of 256 experts = 48), of 128 above (4096 tokens: 96); and the 64-pair kernels'
    shared memory lets two CTAs share an H200 SM (228 KiB, 1 KiB of it reserved per CTA, plus their static
    shared memory), the 128-pair ones' as csrc/moe_wgmma.cu's eight-stage ring had it."""
    from plugins.moe_experts import WGMMA, wgmma_group, wgmma_shared_bytes
    assert WGMMA.prefill_small_groups_up_to == 64.0
    assert wgmma_group(torch.zeros(2048, 6, dtype=torch.int32), 256) == 64
    assert wgmma_group(torch.zeros(2730, 6, dtype=torch.int32), 256) == 64
    assert wgmma_group(torch.zeros(2731, 6, dtype=torch.int32), 256) == 128
    assert wgmma_group(torch.zeros(4096, 6, dtype=torch.int32), 256) == 128
    assert wgmma_shared_bytes(128) == 8 * (128 * 128 + 128 * 64 + 128 * 4 + 128 * 4) + 1024
    assert 2 * (wgmma_shared_bytes(64) + 1024 + 1024) <= 228 * 1024 < 2 * (wgmma_shared_bytes(128) + 1024)
