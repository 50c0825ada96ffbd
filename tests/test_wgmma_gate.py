"""The wgmma gate's rule (bench/wgmma_gate.py) on made-up logits: what passes and what does not."""
import torch

from bench.wgmma_gate import agreement, gate_prompts, passes


def logits(steps: int, seed: int, noise: float = 0.0, base: torch.Tensor | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, 64, generator=g) if base is None else base.clone()
    return x + noise * torch.randn(x.shape, generator=g)


def test_agreement_reads_steps_of_every_prompt_in_turn():
    a = [logits(5, 0), logits(4, 1)]
    same = agreement(a, [t.clone() for t in a])
    assert len(same["cosine_per_step"]) == 9
    assert same["worst_cosine"] > 1 - 1e-12 and same["argmax_agreement"] == 1.0
    off = agreement(a, [a[0], -a[1]])                # the second prompt's steps point the other way
    assert off["worst_cosine"] < -0.99 and off["median_cosine"] > 0.99 and off["argmax_agreement"] < 1.0


def test_the_gate_judges_the_bulk_of_the_steps_not_the_worst_one():
    base = [logits(17, p) for p in range(3)]
    noisy = agreement([logits(17, 10 + p, 0.05, b) for p, b in enumerate(base)], base)
    # a path closer to the default than its noise on every step but one, much worse on that one, passes
    close = [logits(17, 20 + p, 0.01, b) for p, b in enumerate(base)]
    close[0][6] = -base[0][6]
    assert passes(agreement(close, base), noisy)
    # a path somewhat worse than the noise on most steps fails
    loose = agreement([logits(17, 30 + p, 0.08, b) for p, b in enumerate(base)], base)
    assert loose["median_cosine"] < noisy["median_cosine"] and not passes(loose, noisy)
    assert passes(noisy, noisy)


def test_gate_prompts_keep_the_first_as_before_and_differ():
    prompts, forced = gate_prompts(3, 512, 16)
    assert prompts[0] == [(7 * i + 3) % 1000 + 2 for i in range(512)]     # the prompt of sessions up to 24
    assert forced[0] == [(11 * i + 5) % 1000 + 2 for i in range(16)]
    assert len({tuple(p) for p in prompts}) == 3 and all(len(f) == 16 for f in forced)
    assert all(2 <= t <= 1001 for p in prompts + forced for t in p)
