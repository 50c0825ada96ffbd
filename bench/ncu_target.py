"""FP8 GEMV launches of one shape for Nsight Compute: `ncu --set full -k regex:dsv4_fp8 -s 2 -c 1 python
bench/ncu_target.py N K` profiles the third (results: bench/results/ncu-fp8-gemv-*-h200.txt)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.kernels import random_fp8  # noqa: E402
from plugins.fp8_linear import fp8_linear_decode  # noqa: E402

n, k = (int(a) for a in sys.argv[1:3])
w, s = random_fp8(n, k)
x = torch.randn(1, k, device="cuda").to(torch.bfloat16)
for _ in range(3):
    fp8_linear_decode(x, w, s)
torch.cuda.synchronize()
