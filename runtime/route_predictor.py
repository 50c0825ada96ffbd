"""Predicts which routed experts a layer will use one layer before it runs, inside the decode step.

The prediction for layer j applies layer j's own router (its ffn hyper-connection pre, ffn norm, gate and
bias, top-k) to the hidden streams entering layer j-1, so the copies it starts have one whole layer of
time to land. Hash-routed layers need no prediction: their experts follow from the token ids.

The picks go to host memory by an asynchronous copy, followed by a ready flag, so the host learns them
while the GPU runs on (a CUDA graph replay included: the copies are nodes of the graph). The host clears
the flags before each step and waits for each flag in turn (`wait`).
"""
from __future__ import annotations

import time

import torch

import plugins.ops  # noqa: F401  (registers torch.ops.dsv4)
from plugins.oracle import wide


def _host_buffer(shape: tuple[int, ...], cuda: bool) -> torch.Tensor:
    """Host memory the GPU writes into during a step: page-locked by registration, not by torch's pinned
    allocator, whose per-copy bookkeeping has no business inside graph capture."""
    t = torch.zeros(shape, dtype=torch.int32)
    if cuda:
        err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
        if int(err) != 0:
            raise RuntimeError(f"cudaHostRegister failed ({err})")
    return t


class RoutePredictor:
    def __init__(self, config, targets: dict[int, dict[str, torch.Tensor]], batch: int, device: torch.device):
        """`targets[j]`: the weights of chained layer j (a score-routed layer) whose experts are predicted
        while layer j-1 runs; `config`: the model's config values (rms_norm_eps, hc_eps, hc_sinkhorn_iters,
        scoring_func, num_experts_per_tok) as attributes."""
        self.cfg = config
        self.order = sorted(targets)
        self.index = {j: i for i, j in enumerate(self.order)}
        self.weights = {j: {n: w[n] for n in ("hc_ffn_fn", "hc_ffn_scale", "hc_ffn_base", "ffn_norm.weight",
                                               "ffn.gate.weight", "ffn.gate.bias")} for j, w in targets.items()}
        k = config.num_experts_per_tok
        cuda = device.type == "cuda"
        self.picks = torch.zeros(len(self.order), batch, k, dtype=torch.int32, device=device)
        self.one = torch.ones(1, dtype=torch.int32, device=device)
        self.host_picks = _host_buffer((len(self.order), batch, k), cuda)
        self.host_ready = _host_buffer((len(self.order),), cuda)
        self._ready = self.host_ready.numpy()          # read without torch's per-call overhead while waiting

    @torch.inference_mode()
    def __call__(self, j: int, h: torch.Tensor) -> None:
        """Inside the step, before chained layer j-1 runs on streams h [B, hc, d]: predict layer j."""
        c, w, i = self.cfg, self.weights[j], self.index[j]
        x = wide(torch.ops.dsv4.hc_pre_norm(h[:, None], w["hc_ffn_fn"], w["hc_ffn_scale"], w["hc_ffn_base"],
                                            w["ffn_norm.weight"], c.rms_norm_eps, c.hc_eps,
                                            c.hc_sinkhorn_iters)[0][:, 0])
        logits = torch.ops.dsv4.wide_linear(x, w["ffn.gate.weight"])
        # the weights (and so the scale) do not matter here, only the experts
        torch.ops.dsv4.route_topk(logits, w["ffn.gate.bias"], c.num_experts_per_tok, c.scoring_func, 1.0,
                                  self.picks[i])                   # the experts written into picks[i] itself
        self.host_picks[i].copy_(self.picks[i], non_blocking=True)
        self.host_ready[i:i + 1].copy_(self.one, non_blocking=True)     # after the picks: same stream

    def clear(self) -> None:
        """Before a step: no prediction has arrived."""
        self._ready[:] = 0

    def wait(self, j: int, timeout_s: float = 60.0) -> list[int]:
        """The experts predicted for chained layer j (every row's), most likely first (the rows' first picks,
        then their second ...), once the step has written them."""
        i = self.index[j]
        deadline = time.monotonic() + timeout_s
        while not self._ready[i]:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no expert prediction for chained layer {j} after {timeout_s:.0f} s")
        return list(dict.fromkeys(self.host_picks[i].T.flatten().tolist()))   # each row's best first
