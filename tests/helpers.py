"""Helpers shared by tests."""
import re
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from plugins.formats import mxfp4_quant

# The tiny CUDA artifact tests' prompt and forced tokens (tests/test_artifact_gpu.py; also
# test_kernels_moe_wgmma.py and bench/tiny_moe_noise.py): 140 tokens, so a ratio-128 block completes.
TINY_PROMPT, TINY_FORCED = [5, 17, 99, 300, 12] * 28, [3, 4, 5, 6, 7, 8]


def random_experts(n: int, d: int, f: int, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """n routed experts as checkpoint tensors (w1, s1, w3, s3, w2, s2), realistically scaled."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        w1, s1 = mxfp4_quant(torch.randn(f, d, generator=g) / d ** 0.5)
        w3, s3 = mxfp4_quant(torch.randn(f, d, generator=g) / d ** 0.5)
        w2, s2 = mxfp4_quant(torch.randn(d, f, generator=g) / f ** 0.5)
        out.append((w1, s1, w3, s3, w2, s2))
    return out


def split_table(bank: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The experts of `bank` packed, even ones on the GPU and odd ones in pinned host memory (read over the bus
    through the same table, as a paged model reads them): their device table [n] int64 and the stores it
    points into (the caller keeps them alive)."""
    from plugins.moe_experts import pack_expert
    stores = [pack_expert(*e).cuda() if i % 2 == 0 else pack_expert(*e).pin_memory() for i, e in enumerate(bank)]
    return torch.tensor([s.data_ptr() for s in stores], dtype=torch.int64, device="cuda"), stores


def routed_chunk(tokens: int, d: int, n_exp: int, k: int, hot_expert: int | None = None, seed: int = 3):
    """A prefill chunk on the GPU: x [tokens, d] bf16, each token's k distinct experts [tokens, k] int32
    (with `hot_expert`, every token routed to it) and route weights [tokens, k] float32."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d, generator=g).to(torch.bfloat16).cuda()
    experts = torch.stack([torch.randperm(n_exp, generator=g)[:k] for _ in range(tokens)]).to(torch.int32)
    if hot_expert is not None:
        experts[:, 0] = torch.where(experts[:, 1:].eq(hot_expert).any(1), experts[:, 0], hot_expert)
    weights = torch.rand(tokens, k, generator=g) + 0.1
    return x, experts.cuda(), weights.cuda()


def greedy_both_ways(model, prompt: list[int], new: int) -> tuple[list[int], list[int], list[int]]:
    """An artifact model's greedy tokens after `prompt`: stepped one at a time with each argmax read back;
    the first 4 of `decode_greedy`, closed there; then all of `decode_greedy` (each from a fresh prefill)."""
    def first_token() -> int:
        model.reset(1)
        return int(model.forward(torch.tensor([prompt]), 0)[0].argmax())

    stepped = [first_token()]
    for i in range(new):
        stepped.append(int(model.step(torch.tensor(stepped[-1:]), torch.tensor([len(prompt) + i]))[0].argmax()))
    stopped = model.decode_greedy(first_token(), len(prompt), new)
    early = [next(stopped) for _ in range(4)]
    stopped.close()
    return stepped, early, [first_token(), *model.decode_greedy(stepped[0], len(prompt), new)]


def count_bucket_runs(model, size: int) -> list:
    """Wrap `model`'s prefill programs of bucket `size` so each call appends to the returned list (which
    chunks went through them); called plainly, not through a CUDA graph captured before the wrap."""
    ran: list = []
    model.prefill_buckets[size] = [lambda *a, run=run: ran.append(1) or run(*a) for run in model.prefill_buckets[size]]
    return ran


def expert_tensors(ckpt, prefix: str) -> tuple:
    """w1, s1, w3, s3, w2, s2 of one routed expert of a checkpoint, in `pack_expert`'s argument order."""
    return tuple(ckpt.get(f"{prefix}{w}.{k}") for w in ("w1", "w3", "w2") for k in ("weight", "scale"))


def kernel_params(name: str) -> list[str]:
    """The parameters of the extern "C" kernel `name` as declared under plugins/csrc (one string each): what a
    launch must pass, since the driver takes any number of arguments without a word. A name ending in digits
    may be declared by a macro that pastes them in (`..._d##CHUNKS`, maybe then `##SUFFIX`)."""
    stem, digits = re.fullmatch(r"(.*?)(\d*)", name).groups()
    named = re.escape(stem) + (f"(?:{digits}|##\\w+)(?:##\\w+)?" if digits else "")
    for source in sorted((Path(__file__).parents[1] / "plugins" / "csrc").glob("*.cu")):
        text = source.read_text()
        found = re.search(r'extern "C" __global__ void(?:\s+__launch_bounds__\([^)]*\))?\s+' + named
                          + r"\(([^)]*)\)", text)
        if found:
            return [p.strip(" \\\n") for p in found.group(1).split(",")]
    raise LookupError(f"no kernel {name} under plugins/csrc")


H200_SHARED = (233_472, 232_448)     # bytes of shared memory per SM, the most one CTA may have


class Launch(NamedTuple):
    name: str
    grid: tuple
    block: int
    args: list
    shared: int
    cluster: int

    def given(self) -> dict:
        """The launch's argument values by the kernel's parameter names (`kernel_params`); checks the count."""
        params = kernel_params(self.name)
        assert len(self.args) == len(params), (self.name, len(self.args), params)
        return dict(zip((p.split()[-1] for p in params), (a for a, _ in self.args)))


class RecordedLaunches:
    """A stand-in for the kernel image (plugins.loader.KernelImage) that records the launches made through it,
    on an H200's shared memory."""
    def __init__(self):
        self.launches: list[Launch] = []

    def shared_memory(self):
        return H200_SHARED

    def launch(self, name, grid, block, args, shared=0, cluster=1):
        self.launches.append(Launch(name, grid, block, args, shared, cluster))


class EndsAt:
    """A tokenizer with end of sentence moved to `eos`: a random model's answer ends where a test wants."""

    def __init__(self, tok, eos: int):
        self.tok, self.eos_id = tok, eos

    def __getattr__(self, name):
        return getattr(self.tok, name)


class KnownDrafts:
    """Wraps a drafter, which still runs (its time and caches), and drafts from a known answer `full` (prompt
    and tokens by position): the right token where `right(n)` holds for the n-th draft, else a wrong one.
    Speculative decoding's accepted path, on weights whose own drafts are noise."""

    def __init__(self, drafter, full: list[int], right: Callable[[int], bool], vocab: int):
        self.drafter, self.full, self.right, self.vocab, self.calls = drafter, full, right, vocab, 0
        self.drafted: list[int] = []                   # what the drafter drafted, each time

    def __getattr__(self, name):                       # the drafter's caches and graphs
        return getattr(self.drafter, name)

    def draft(self, ids: list[int], start: int) -> int:
        return self.replace(start + len(ids) + 1, self.drafter.draft(ids, start))

    def replace(self, target: int, drafted: int) -> int:
        """The draft for position `target` in place of the drafter's `drafted` (the greedy device pass drafts on
        the device, runtime/drafted_pass.py, and asks this after each pass)."""
        self.drafted.append(drafted)
        self.calls += 1
        if target >= len(self.full):
            return 0
        return self.full[target] if self.right(self.calls) else (self.full[target] + 1) % self.vocab
