"""Measures an artifact as users see it: time to first token, prefill and decode tokens per second,
greedy tokens (so runs can be checked against each other), and, on a GPU, decode against the device's
copy bandwidth measured in the same process: (bytes one decode step must read / copy bandwidth)
divided by the measured step time."""
from __future__ import annotations

import json
import time

import torch


def synthetic_prompt(n: int) -> list[int]:
    """The benchmarks' fixed prompt of n token ids (the same for every run, so runs compare)."""
    return [(7 * i + 3) % 1000 + 2 for i in range(n)]


def copy_bandwidth(device: torch.device | str = "cuda", nbytes: int = 2 << 30, iters: int = 20) -> float:
    """Device-to-device copy: (read + written bytes) / time, bytes/s; the median of `iters` copies. The
    one yardstick of every decode figure (kernels and end to end)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return 2 * nbytes / sorted(times)[len(times) // 2]


def bytes_per_token(model) -> int:
    """What one decode step reads at least: every chained layer's dense weights, the routed experts a
    token picks in each layer, one embedding row, the head."""
    k = model.config.num_experts_per_tok
    bank = json.loads((model.root / "bank.json").read_text())
    total = model.head.numel() * model.head.element_size() + model.embed[0].numel() * model.embed.element_size()
    for run, table, weights, caches in model.layers:
        total += sum(t.numel() * t.element_size() for t in weights.values())
    total += sum(k * bank[str(e["layer"])]["expert_bytes"] for e in model.manifest["layers"]
                 if e["prefix"].startswith("layers."))
    return total


def routed_expert_bytes(model) -> int:
    """All routed experts of the chained layers: what an all-resident run keeps on the device."""
    n = model.config.n_routed_experts
    bank = json.loads((model.root / "bank.json").read_text())
    return sum(n * bank[str(e["layer"])]["expert_bytes"] for e in model.manifest["layers"]
               if e["prefix"].startswith("layers."))


def _sync(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def prefill_seconds(model, prompt: list[int]) -> tuple[float, torch.Tensor]:
    """Seconds to prefill `prompt` into a fresh cache (synchronised before and after), and its logits."""
    model.reset(1)
    _sync(model)
    t0 = time.perf_counter()
    logits = model.forward(torch.tensor([prompt]), 0)     # float32 logits on the CPU: synchronised
    return time.perf_counter() - t0, logits


@torch.inference_mode()
def measure(model, prompt: list[int], new_tokens: int) -> dict:
    """Greedy generation from `prompt`, timed. The prompt runs twice: the first time (a fresh model's first
    request: CUDA modules loaded on first use, library handles made) is reported as the cold time to first
    token; the second, after emptying the caches, gives the time to first token and prefill speed. Pager
    counters start after the first."""
    cold, _ = prefill_seconds(model, prompt)
    if getattr(model, "pager", None) is not None:
        model.pager.reset_stats()
    ttft, logits = prefill_seconds(model, prompt)
    tokens = [int(logits[0].argmax())]
    t1 = time.perf_counter()
    tokens += model.decode_greedy(tokens[0], len(prompt), new_tokens - 1)   # each token read on the host, as in use
    decode = time.perf_counter() - t1
    figures = {"prompt_tokens": len(prompt), "cold_time_to_first_token_s": cold, "time_to_first_token_s": ttft,
               "prefill_tok_s": len(prompt) / ttft,
               "decode_tokens": new_tokens - 1, "decode_tok_s": (new_tokens - 1) / decode,
               "decode_step_ms": 1e3 * decode / max(new_tokens - 1, 1), "tokens": tokens}
    # drafts where the experts are resident: a paged run's pager counters are its plain decode's
    if getattr(model, "drafter", None) is not None and getattr(model, "pager", None) is None:
        spec = figures["speculative"] = measure_speculative(model, prompt, new_tokens, tokens)
        spec["pays_above_acceptance"] = pays_above(spec["accepted_pass_ms"], figures["decode_step_ms"])
    return figures


def pays_above(pass_ms: float, step_ms: float) -> float:
    """The share of drafts accepted above which drafted decode outruns plain steps of `step_ms`, where a pass
    costs `pass_ms` whatever its draft (greedy's device pass verifies both tokens and drafts from two positions
    either way): a pass gives 1 + a tokens for a accepted, so it pays where (1 + a) * step > pass. 1 or more:
    it cannot pay."""
    return pass_ms / step_ms - 1


def accepted_pass_seconds(model, ids: list[int], q: int, passes: int, device: bool = True) -> float:
    """Median seconds over `passes` of the pass an accepted draft costs, as decoding runs it, from ids[0] at q
    and its draft ids[1]: greedy's pass decided on the device (runtime/drafted_pass.py: whatever it accepts,
    it verifies both tokens and drafts from two positions), or with `device` False (or no such pass) the
    host's: the verification, then the MTP block's draft from both positions (ids[1:]). Each ends on the
    host's read of what it decided, as in use."""
    times = []
    for _ in range(passes):
        _sync(model)
        t0 = time.perf_counter()
        if device and model.drafted_pass is not None:
            model.drafted_pass.start(ids[0], q, ids[1])
            model.drafted_pass.run()
        else:
            model.verify(ids[:2], q)
            model.drafter.draft(ids[1:], q)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure_speculative(model, prompt: list[int], new_tokens: int, plain: list[int], passes: int = 20) -> dict:
    """The same greedy decode with the MTP block's drafts verified two tokens a pass (runtime/speculative.py),
    from a fresh prefill: decode tok/s (the drafter's fill over the prompt's last window included), drafts
    made and accepted, and whether the tokens are the plain loop's. Then the pass that an accepted draft
    costs, timed alone (the median of `passes`): the verification of a token and its draft and the block's
    next draft from the two positions, whose two tokens a pass bound drafted decode from above whatever the
    weights' acceptance rate (synthetic weights draft noise, and their chaotic logits turn on any rounding);
    greedy's pass, decided on the device, and the host's (sampling's) beside it."""
    from .speculative import Speculative
    _, logits = prefill_seconds(model, prompt)
    speculative = Speculative(model, prompt, int(logits[0].argmax()), new_tokens)
    picks = iter(speculative)
    tokens = [next(picks)]
    t0 = time.perf_counter()
    tokens += picks                                    # each token read on the host
    decode = time.perf_counter() - t0
    q = len(prompt) + 1                                # past the answer's first token: a position fed anew each pass
    three = (plain + prompt)[:3]                       # any three tokens: timing only
    accepted_pass = accepted_pass_seconds(model, three, q, passes)
    return {"decode_tok_s": (new_tokens - 1) / decode, "decode_step_ms": 1e3 * decode / max(new_tokens - 1, 1),
            "drafted": speculative.stats.drafted, "accepted": speculative.stats.accepted,
            "tokens_match_plain": tokens == plain, "accepted_pass_ms": 1e3 * accepted_pass,
            "host_pass_ms": 1e3 * accepted_pass_seconds(model, three, q, passes, device=False),
            "decode_tok_s_all_accepted": 2 / accepted_pass}
