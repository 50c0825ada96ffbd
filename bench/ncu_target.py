"""FP8 GEMV launches of one shape for Nsight Compute: `ncu --set full -k regex:dsv4_fp8 -s 2 -c 1 python
bench/ncu_target.py N K` profiles the third (results: bench/results/ncu-fp8-gemv-*-h200.txt)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from plugins.fp8_linear import fp8_linear_decode  # noqa: E402

n, k = (int(a) for a in sys.argv[1:3])
w = torch.randint(-100, 100, (n, k), device="cuda", dtype=torch.int8).view(torch.float8_e4m3fn)
s = torch.full(((n + 127) // 128, k // 128), 120, device="cuda", dtype=torch.uint8).view(torch.float8_e8m0fnu)
x = torch.randn(1, k, device="cuda").to(torch.bfloat16)
for _ in range(3):
    fp8_linear_decode(x, w, s)
torch.cuda.synchronize()
