"""Launches of one kernel shape for Nsight Compute; `ncu --set full -k regex:NAME -s 2 -c 1 python
bench/ncu_target.py ...` profiles the third launch (results: bench/results/ncu-*-h200.txt).
    python bench/ncu_target.py fp8 N K      FP8 GEMV of an N x K projection, one row
    python bench/ncu_target.py moe [wgmma]  MXFP4 routed experts of one token (6 of 64 Flash-size experts),
                                            on the mma.sync kernels or the warpgroup-MMA ones (sm_90)
    python bench/ncu_target.py moe_prefill T  the prefill MoE on warpgroup MMA (sm_90) over T Flash tokens
                                            (256 experts, 6 per token, random routing)
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.kernels import random_flash_bank, random_fp8, random_routing  # noqa: E402
from plugins.fp8_linear import fp8_linear_decode  # noqa: E402
from plugins.moe_experts import make_workspace, moe_experts_decode, moe_experts_prefill_wgmma  # noqa: E402


def moe_launch(wgmma: bool):
    """bench/kernels.py's MoE decode setup, cut to what one launch needs."""
    d, f, k, n = 4096, 2048, 6, 64
    bank, table = random_flash_bank(n, d, f)
    ids = torch.randperm(n)[:k].view(1, k).to(torch.int32).cuda()
    x = torch.randn(1, d, device="cuda").to(torch.bfloat16)
    w, ws = torch.full((1, k), 0.25, device="cuda"), make_workspace(1, k, d, f, "cuda")
    return lambda bank=bank: moe_experts_decode(x, ids, w, table, f, 10.0, None, ws, wgmma=wgmma)  # keeps bank alive


def moe_prefill_launch(tokens: int):
    """bench/kernels.py's prefill MoE setup (bench_moe_prefill), the warpgroup-MMA kernels."""
    d, f, k, n = 4096, 2048, 6, 256
    bank, table = random_flash_bank(n, d, f)
    x, experts, w = random_routing(tokens, n, d, k)
    return lambda bank=bank: moe_experts_prefill_wgmma(x, experts, w, table, f, 10.0)


if sys.argv[1] == "moe":
    launch = moe_launch(sys.argv[2:3] == ["wgmma"])
elif sys.argv[1] == "moe_prefill":
    launch = moe_prefill_launch(int(sys.argv[2]))
else:
    n, k = (int(a) for a in sys.argv[2:4])
    w, s = random_fp8(n, k)
    x = torch.randn(1, k, device="cuda").to(torch.bfloat16)
    launch = lambda: fp8_linear_decode(x, w, s)  # noqa: E731
for _ in range(3):
    launch()
torch.cuda.synchronize()
# /usr/local/cuda/bin/ncu --set full -k regex:dsv4_fp8 -s 2 -c 1 python bench/ncu_target.py fp8 32768 1024
# (H200, session 6; ncu runs the SM at 1.37 GHz)
