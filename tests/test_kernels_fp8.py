import pytest
import torch

from plugins.formats import fp8_weight_dequant, fp8_weight_quant
from plugins.oracle import quantised_matmul


def test_fat_binary_builds(fat_binary):
    assert fat_binary.stat().st_size > 10_000


def test_a_second_build_passes_its_macros_to_nvcc(tmp_path):
    """`python -m plugins.build -D NAME=VALUE` (a build to time against the default one) reaches nvcc as -D."""
    from plugins.build import nvcc_command
    cmd = nvcc_command([tmp_path / "a.cu"], tmp_path / "k.fatbin", ("DSV4_X=(32<<10)", "DSV4_Y"))
    assert "-DDSV4_X=(32<<10)" in cmd and "-DDSV4_Y" in cmd
    assert not any(c.startswith("-D") for c in nvcc_command([tmp_path / "a.cu"], tmp_path / "k.fatbin"))


def test_the_kernel_image_comes_from_the_fat_binary_named_at_first_use(tmp_path, monkeypatch):
    """bench/fatbin_ab.py points a process at another build of the kernels by setting loader.FATBIN before
    the first launch."""
    from plugins import loader
    other = tmp_path / "other.fatbin"
    monkeypatch.setattr(loader, "KernelImage", lambda path: path)     # no GPU here: the path it would load
    monkeypatch.setattr(loader, "FATBIN", other)
    loader.kernels.cache_clear()
    try:
        assert loader.kernels() == other
    finally:
        loader.kernels.cache_clear()


# The wgmma GEMV's share of outputs that round differently from the exact oracle (the other GEMV: 0.05). The
# H200 gave 0.03-0.075 over these cases, and 0.083 (2 of 24) on the smallest; each a one-ulp flip of a bf16
# output (the largest error about 0.004 of the largest output).
WGMMA_MISMATCH = 0.1


def _weights(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return fp8_weight_quant(torch.randn(n, k, generator=g) / k ** 0.5)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 9, 16], ids=lambda m: f"{m}rows")
@pytest.mark.parametrize("n, k", [(1024, 4096), (32768, 1024), (4096, 8192), (1000, 256), (2048, 128), (512, 7168),
                                   (24, 384)],
                         ids=["wq_a", "wq_b", "wo_b", "odd-n", "k128", "pro-wkv", "tiny-k3blocks"])
def test_fp8_linear_decode_matches_oracle(m, n, k):
    from plugins.fp8_linear import fp8_linear_decode
    w, s = _weights(n, k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    x[0, :128] *= 1e-6                                   # a block below the amax floor
    expect = quantised_matmul(x.cuda(), fp8_weight_dequant(w, s).cuda())
    got = fp8_linear_decode(x.cuda(), w.cuda(), s.cuda())
    cos = torch.nn.functional.cosine_similarity(got.double(), expect.double(), dim=-1)
    assert cos.min() > 0.99999
    # exact products, fp32 sums in another order (tensor cores): almost all elements round the same
    assert (got != expect).float().mean() < 0.05
    assert torch.allclose(got.float(), expect.float(), rtol=2 ** -7, atol=1e-3 * expect.float().abs().max())


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 8, 9, 16], ids=lambda m: f"{m}rows")
@pytest.mark.parametrize("n, k", [(1024, 4096), (32768, 1024), (4096, 8192), (4096, 2048), (1000, 256), (24, 384),
                                   (40, 640)],
                         ids=["wq_a-8ranks", "wq_b", "wo_b-4ranks", "w2-4ranks", "odd-n-2ranks", "k3blocks",
                              "k5blocks"])
def test_fp8_gemv_wgmma_matches_oracle(m, n, k):
    """csrc/fp8_gemv_wgmma.cu against the oracle. Its FP8 MMA adds within a 128-K block in less than float32 (as
    DeepSeek's fp8_gemm on Hopper), where the other GEMV adds exact products: more outputs round differently
    (WGMMA_MISMATCH), each by little."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma GEMV is sm_90 only")
    from plugins.fp8_linear import fp8_linear_decode_wgmma
    w, s = _weights(n, k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    x[0, :128] *= 1e-6                                   # a block below the amax floor
    x, w, s = x.cuda(), w.cuda(), s.cuda()
    expect = quantised_matmul(x, fp8_weight_dequant(w, s))
    got = fp8_linear_decode_wgmma(x, w, s)
    cos = torch.nn.functional.cosine_similarity(got.double(), expect.double(), dim=-1)
    assert cos.min() > 0.99999
    assert (got != expect).float().mean() < WGMMA_MISMATCH
    assert torch.allclose(got.float(), expect.float(), rtol=2 ** -7, atol=1e-3 * expect.float().abs().max())
    out = torch.empty_like(got)                          # the same bits again, and inside a CUDA graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fp8_linear_decode_wgmma(x, w, s, out)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, got)


def test_wgmma_gemv_splits_k_where_row_blocks_do_not_fill_the_gpu():
    """plugins.fp8_linear.wgmma_gemv_parts on an H200 (132 SMs): about two CTAs an SM, K's blocks divided."""
    from plugins.fp8_linear import wgmma_gemv_parts
    assert wgmma_gemv_parts(32768, 1024, 132) == 1       # wq_b: 512 row blocks
    assert wgmma_gemv_parts(4096, 8192, 132) == 4        # wo_b: 64 row blocks
    assert wgmma_gemv_parts(4096, 2048, 132) == 4        # the shared expert's w2
    assert wgmma_gemv_parts(1024, 4096, 132) == 8        # wq_a: 16 row blocks, the most ranks a cluster takes
    assert wgmma_gemv_parts(24, 384, 132) == 1           # 3 blocks: no split divides them
    assert wgmma_gemv_parts(1000, 256, 132) == 2


@pytest.mark.gpu
@pytest.mark.parametrize("m, n, k", [(2, 4096, 1024), (12, 1024, 4096)], ids=["fused", "act-quant-kernel"])
def test_fp8_linear_decode_captures_in_a_cuda_graph(m, n, k):
    from plugins.fp8_linear import fp8_linear_decode, make_workspace
    w, s = (t.cuda() for t in _weights(n, k))
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    out, ws = torch.empty(m, n, device="cuda", dtype=torch.bfloat16), make_workspace(m, k, "cuda")
    fp8_linear_decode(x, w, s, out, ws)                  # warm-up: loads the module outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fp8_linear_decode(x, w, s, out, ws)
    x.copy_(torch.randn(m, k, device="cuda").to(torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    expect = fp8_linear_decode(x, w, s)
    assert torch.equal(out, expect)


@pytest.mark.gpu
@pytest.mark.parametrize("rows, v, d", [(1, 129280, 4096), (3, 1000, 256), (4, 4099, 512)],
                         ids=["flash-1row", "tiny-3rows", "odd-vocab-4rows"])
def test_bf16_head_kernel_matches_the_float32_head(rows, v, d):
    """The head kept in bf16 (exact: the official fp32 head is loaded from bf16) and accumulated in fp32:
    the float32 linear up to summation order; graph-capturable."""
    from plugins.head import head_logits
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(v, d, generator=g) / d ** 0.5).to(torch.bfloat16).cuda()
    y = torch.randn(rows, d, generator=g).cuda()
    expect = torch.nn.functional.linear(y.double(), w.double())
    got = head_logits(y, w)
    assert got.dtype == torch.float32 and torch.equal(got.argmax(-1), expect.argmax(-1))
    assert torch.allclose(got.double(), expect, rtol=1e-5, atol=1e-5 * expect.abs().max().item())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = head_logits(y, w)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, got)


@pytest.mark.gpu
@pytest.mark.parametrize("split", [1, 2, 4, 8])
@pytest.mark.parametrize("rows, v", [(1, 300), (3, 37)], ids=["1row-300", "3rows-37"])
def test_bf16_head_kernel_split_over_k_matches_the_float32_product(rows, v, split):
    """Narrow weights: `split` warps per row, each a K slice, summed in slice order (rows past the last
    CTA's full share, fewer rows than CTAs): the float32 product up to summation order, deterministic."""
    from plugins.head import head_logits
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(v, 4096, generator=g) / 64).to(torch.bfloat16).cuda()
    y = torch.randn(rows, 4096, generator=g).cuda()
    expect = y.double() @ w.double().T
    got = head_logits(y, w, split=split)
    assert torch.allclose(got.double(), expect, rtol=1e-5, atol=1e-5 * expect.abs().max().item())
    assert torch.equal(got, head_logits(y, w, split=split))


@pytest.mark.gpu
@pytest.mark.parametrize("rows, n", [(1, 1024), (1, 256), (4, 512), (1, 64)],
                         ids=["compressor-1row", "indexer-1row", "gate-4rows", "indexer-weights-1row"])
def test_wide_linear_op_runs_the_head_kernel_for_bf16_weights(rows, n):
    """dsv4::wide_linear on a GPU: float32 rows times a bf16-stored weight (compressor, router gate) through
    the head's kernel, the float32 product over the widened weight up to summation order."""
    import plugins.ops  # noqa: F401
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(n, 4096, generator=g) / 64).to(torch.bfloat16).cuda()
    x = torch.randn(rows, 4096, generator=g).cuda()
    got = torch.ops.dsv4.wide_linear(x, w)
    expect = x.double() @ w.double().T
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    assert torch.allclose(got.double(), expect, rtol=1e-5, atol=1e-5 * expect.abs().max().item())
    from plugins.head import head_logits
    assert torch.equal(got, head_logits(x, w))                        # the kernel ran, not a widened copy
    # bf16 activations go in as they are: the kernel widens them as it loads, the same bits as widened first
    xb = x.to(torch.bfloat16)
    assert torch.equal(torch.ops.dsv4.wide_linear(xb, w), torch.ops.dsv4.wide_linear(xb.float(), w))
    odd = torch.empty(rows * 4096 + 4, dtype=torch.bfloat16, device="cuda")[4:].view(rows, 4096)  # 8-byte offset
    odd.copy_(xb)
    assert torch.equal(head_logits(odd, w), head_logits(xb.float(), w))


@pytest.mark.gpu
@pytest.mark.parametrize("rows, g, r, d, max_ctas",
                         [(1, 8, 1024, 4096, None), (4, 8, 1024, 4096, None), (3, 2, 256, 512, None),
                          (4, 8, 128, 1024, None), (2, 3, 256, 2560, None), (1, 8, 1024, 4096, 7),
                          (2, 3, 384, 1024, 5)],
                         ids=["flash-wo_a-1row", "flash-wo_a-4rows", "small-3rows", "4rows", "k-split-4",
                              "items-cross-groups", "items-cross-groups-2rows"])
def test_grouped_fp8_kernel_matches_the_bf16_grouped_einsum(rows, g, r, d, max_ctas):
    """DeepSeek's wo_a from its FP8 codes: the bf16 grouped einsum over the dequantised weight up to
    summation order; the op dispatches to it; graph-capturable. A capped grid makes CTAs walk items of
    several groups (the kernel stages each group's activation where its items cross into it)."""
    import plugins.ops  # noqa: F401
    from plugins.grouped_linear import grouped_fp8_gemv
    from plugins.oracle import einsum
    gen = torch.Generator().manual_seed(2)
    w, s = fp8_weight_quant(torch.randn(g * r, d, generator=gen) / 32)
    x = torch.randn(rows, 1, g, d, generator=gen)
    x[..., :128] *= 2.0 ** -60                     # blocks far from 1 in either direction: the activation's
    x[..., 128:256] *= 2.0 ** 60                   # power-of-two scale per 128 values must follow them
    x = x.to(torch.bfloat16)
    w, s, x = w.cuda(), s.cuda(), x.cuda()
    expect = einsum("bsgd,grd->bsgr", x, fp8_weight_dequant(w, s).to(torch.bfloat16).view(g, r, d))
    got = grouped_fp8_gemv(x, w, s, max_ctas=max_ctas)
    assert got.dtype == torch.bfloat16 and got.shape == expect.shape
    exact = torch.einsum("bsgd,grd->bsgr", x.double(), fp8_weight_dequant(w, s).double().view(g, r, d))
    tol = 1e-2 * exact.abs().max().item()
    assert (got.double() - exact).abs().max() <= tol and (expect.double() - exact).abs().max() <= tol
    assert torch.nn.functional.cosine_similarity(got.double().flatten(), exact.flatten(), dim=0) > 0.99999
    # the huge block decides every sum above: again without it, all values scaled near bf16's smallest normals
    rest = x.clone()
    rest[..., 128:256] = 0
    rest *= 2.0 ** -90
    exact_rest = torch.einsum("bsgd,grd->bsgr", rest.double(), fp8_weight_dequant(w, s).double().view(g, r, d))
    got_rest = grouped_fp8_gemv(rest, w, s, max_ctas=max_ctas).double()
    assert (got_rest - exact_rest).abs().max() <= 1e-2 * exact_rest.abs().max().item()
    if max_ctas is None:
        assert torch.equal(torch.ops.dsv4.grouped_fp8_linear(x, w, s.view(torch.uint8)), got)
    out = torch.empty_like(got)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        grouped_fp8_gemv(x, w, s, out=out, max_ctas=max_ctas)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, got)


@pytest.mark.gpu
@pytest.mark.parametrize("n, k", [pytest.param(1024, 4096, id="flash-wq_a"), pytest.param(128, 256, id="tiny-k256")])
def test_fp8_linear_op_on_prefill_rows_is_a_bf16_gemm_matching_the_float32_oracle(n, k):
    """More rows than the GEMV takes: the act_quant kernel and cuBLAS's block-scaled FP8 GEMM (CUDA 13 on
    the H200 has it), equal to the float32 oracle up to summation order."""
    import plugins.fp8_linear as fp8_linear
    import plugins.ops  # noqa: F401  (registers torch.ops.dsv4)
    w, s = _weights(n, k)
    x = torch.randn(3, 40, k, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16).cuda()
    got = torch.ops.dsv4.fp8_linear(x, w.cuda(), s.cuda())
    expect = quantised_matmul(x, fp8_weight_dequant(w, s).cuda())
    assert got.shape == (3, 40, n) and got.dtype == torch.bfloat16
    cos = torch.nn.functional.cosine_similarity(got.double().flatten(0, 1), expect.double().flatten(0, 1), dim=-1)
    assert cos.min() > 0.99999
    # fp32 sums in another order (cuBLAS splits K and scales per 128-block): bf16 results may round the other
    # way (6.6% of them did on the H200), but no element may be off by more than one bf16 step of its value
    err = (got.float() - expect.float()).abs()
    assert (err <= expect.float().abs() * 2 ** -7 + 1e-3 * expect.float().abs().max()).all()
    assert fp8_linear._block_scaled is True              # not the bf16 fallback


@pytest.mark.parametrize("shared_memory, fixed, stages", [
    pytest.param((233472, 232448), 12 * 1024, 3, id="h200-two-ctas"),
    pytest.param((233472, 232448), 20864, 2, id="h200-20k-fixed-two-ctas-two-steps"),
    pytest.param((233472, 232448), 16768 + 32, 3, id="h200-wo_b-two-ctas-three-steps"),
    pytest.param((233472, 232448), 60 * 1024, 5, id="h200-big-act-one-cta"),
    pytest.param((102400, 101376), 12 * 1024, 2, id="sm120-one-cta"),
])
def test_gemv_ring_depth_fits_the_gpus_shared_memory(shared_memory, fixed, stages):
    from plugins.fp8_linear import STAGE_BYTES, ring_stages
    got = ring_stages(shared_memory, fixed)
    assert got == stages
    ctas = 2 if got * STAGE_BYTES + fixed <= shared_memory[0] // 2 - 1024 else 1
    assert ctas * (got * STAGE_BYTES + fixed + 1024) <= shared_memory[0]


def test_gemv_ring_refuses_a_gpu_without_room():
    from plugins.fp8_linear import ring_stages
    with pytest.raises(RuntimeError, match="weight ring"):
        ring_stages((65536, 49152), 20 * 1024)


@pytest.mark.parametrize("m, k, shared_memory, fused", [
    pytest.param(1, 8192, (233472, 232448), True, id="h200-wo_b-fused"),
    pytest.param(16, 1024, (233472, 232448), True, id="h200-16rows-fused"),
    pytest.param(4, 4096, (102400, 101376), True, id="sm120-4rows-fused"),
    pytest.param(4, 4096, (81920, 80896), False, id="80k-smem-4rows-no-room-unfused"),
    pytest.param(1, 4096, (102400, 101376), True, id="sm120-1row-fused"),
    pytest.param(16, 4096, (233472, 232448), False, id="many-blocks-unfused"),
])
def test_gemv_plan_falls_back_to_one_act_quant_where_shared_memory_is_short(m, k, shared_memory, fused):
    from plugins.fp8_linear import STAGE_BYTES, gemv_plan
    got_fused, stages, shared = gemv_plan(m, k, shared_memory)
    assert got_fused == fused and stages >= 2
    assert shared >= stages * STAGE_BYTES and shared + 32 <= shared_memory[1]   # + the norm prologue's scratch


def test_wo_b_gets_a_third_ring_stage_at_two_ctas_an_sm():
    """wo_b's 8192-wide activation (16.8 KB of f16 values) left room for two ring stages beside a static 4 KB
    of K-slice sums; with those sums in the ring (session 29) a third fits at two CTAs an SM on an H200."""
    from plugins.fp8_linear import gemv_plan
    fused, stages, shared = gemv_plan(1, 8192, (233472, 232448))
    assert fused and stages == 3
    assert 2 * (shared + 32 + 1024) <= 233472


def test_gemv_split_rule_picks_the_measured_fastest_split():
    """The GEMV's split of K across warps (plugins.fp8_linear.split_for) against the H200 sweep of every
    split (bench/gemv_split_sweep.py): on each decode shape it picks a split within 3% of the fastest
    measured (an H200: 132 SMs, two CTAs of the 1-row GEMV each)."""
    import json
    from pathlib import Path
    from plugins.fp8_linear import split_for
    sweep = json.loads((Path(__file__).parents[1] / "bench/results/gemv-split-sweep-h200.json").read_text())
    times: dict[tuple[str, int, int], dict[int, float]] = {}
    for r in sweep["results"]:
        if r["rows"] == 1 and isinstance(r["wpr"], int):
            times.setdefault((r["weight"], r["N"], r["K"]), {})[r["wpr"]] = r["time_us"]
    assert len(times) >= 6
    for (name, n, k), by_split in times.items():
        chosen = split_for(n, k, resident=264, sms=132)[0]
        assert by_split[chosen] <= 1.03 * min(by_split.values()), (name, chosen, by_split)


def test_k_split_leaves_the_head_whole_and_splits_narrow_weights():
    from plugins.head import UNROLL, k_split
    warps = 132 * 8 * 8                                   # an H200's resident warps at 8 CTAs of 8 per SM
    assert k_split(129280, 16, warps) == 1                # the vocabulary head fills the GPU row by row
    for rows in (256, 512, 1024):                         # router gate, compressor products
        split = k_split(rows, 16, warps)
        assert split > 1 and 16 % split == 0 and 16 // split >= UNROLL
    assert k_split(256, 1, warps) == 1                    # a 256-wide row is one chunk: nothing to split
