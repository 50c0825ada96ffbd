"""Runs a built artifact: the decode layer programs chained over buffers allocated once, each layer's
dense weights bound from its weights file, routed experts read through tables of addresses.

`ArtifactModel` has the reference model's interface (`reset`, `forward(ids, start)`), so the
forced-token harness and the generation loop drive both. One decode step is the whole chain (embed,
every layer, head) over static buffers (`tokens`, `positions`, caches); on CUDA it is captured once
as a CUDA graph and replayed per token. A prompt goes through the prefill programs in chunks of the
recipe's `prefill_chunk` tokens (the same caches), where the artifact has them (aoti, decode batch 1), the
last (or only) chunk through the smallest of the recipe's `prefill_buckets` that holds it, so a short prompt
is not padded to a whole chunk; otherwise through the one-token step. On a GPU each prefill size is
captured as a CUDA graph of its own (no op synchronises), so a chunk is one replay, not the programs'
hundreds of launches from the host.

TensorRT engines (runtime/trt_executor.py) take the compiled programs' place with the same contract.
AOTInductor packages are loaded with `run_single_threaded=True`: the default model container waits on
events between runs, which is not allowed while a stream is capturing; the single-threaded runner skips
that bookkeeping and keeps the proxy executor that calls the `dsv4::` ops, so the chain captures.
"""
from __future__ import annotations

import gc
import json
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch._inductor  # noqa: F401  (here, not first inside a load: the import keeps the frames it ran under,
#                         and so the first model loaded in a process, alive; session 61: `dsv4 bench` ran out of
#                         an 80 GB GPU at Flash-8, its first mode's model never freed)
from safetensors.torch import load_file

import plugins.ops  # noqa: F401  (the packages call torch.ops.dsv4)
from plugins.head import GreedyPick, head_logits, kernel_fits
from plugins.oracle import hc_head, ring_update, rms_norm, wide, wide_dtype

from .draft import Head, MTPDraft
from .drafted_pass import DraftedPass
from .errors import UserError
from .expert_bank import ExpertBank
from .expert_pager import PagedExperts
from .expert_store import DeviceExperts, HostExperts
from .manifest import Progress, load_manifest, no_progress
from .route_predictor import RoutePredictor

# a ratio-4 layer's compressor states (builder/programs/decode.py `new_caches`), whose first 4 rows hold the
# previous block (ratio 4 overlaps blocks)
OVERLAP_STATES = ("comp_kv", "comp_score", "idx_kv", "idx_score")
# what the expert pager fetches ahead of use (ArtifactModel's `prefetch`)
PREFETCH = ("predict", "hash", "none")
# layer -> a module with the layer programs' contract; the eager backend runs these as they are
ProgramFactory = Callable[[int], torch.nn.Module]


class _Config:
    """The few config values the runtime's head and route predictor need, read from the artifact's
    config.json (named as the builder's ModelConfig names them)."""

    def __init__(self, raw: dict):
        self.hc_mult, self.hidden_size = raw["hc_mult"], raw["hidden_size"]
        self.rms_norm_eps, self.hc_eps = raw["rms_norm_eps"], raw["hc_eps"]
        self.vocab_size = raw["vocab_size"]
        self.hc_sinkhorn_iters, self.scoring_func = raw["hc_sinkhorn_iters"], raw["scoring_func"]
        self.num_experts_per_tok = raw["num_experts_per_tok"]
        self.n_routed_experts = raw["n_routed_experts"]
        self.compress_ratios, self.sliding_window = raw["compress_ratios"], raw["sliding_window"]


class ArtifactModel:
    def __init__(self, root: str | Path, device: str = "cpu", programs: ProgramFactory | None = None,
                 graphs: bool = False, batch: int = 1, expert_slots: int | None = None,
                 prefill: ProgramFactory | None = None, prefetch: str = "predict", progress: Progress | None = None,
                 draft: bool = False):
        """`programs` replaces the compiled programs by modules (the eager comparison, or an eager
        artifact); `graphs` captures the decode step as one CUDA graph where it can be (bfloat16 compiled
        programs: `self.capturable`); `expert_slots` > 0 keeps only
        that many routed experts in device slots and pages the rest (0: every expert resident; None: as the
        recipe says); `prefetch` is what the pager fetches ahead of use: "predict" (the hash-routed layers'
        experts from the token ids, the others' from the route predictor), "hash" (the former only) or
        "none" (it only admits experts it missed: the baseline). `prefill` gives prefill modules to run
        eagerly alongside `programs`. `progress(stage, done, total)` follows the long steps of a load (hashing,
        copying experts, loading layers, capturing graphs: minutes at Flash size). `draft` loads the MTP block
        as the drafter of speculative decoding (`self.drafter`) where the artifact has its programs (aoti
        builds with `draft_tokens`, decode batch 1)."""
        report = progress or no_progress
        self.root = Path(root)
        self.manifest = m = load_manifest(self.root, progress=progress)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: this machine has no CUDA GPU")
        if programs is None and m["backend"] == "aoti" and m["device"] != self.device.type:
            raise UserError(f"this artifact's programs are compiled for {m['device']}; run it on {m['device']}")
        if programs is None and m["backend"] == "eager":
            raise UserError("eager artifacts run through `dsv4 run`, which supplies the layer programs")
        if prefetch not in PREFETCH:
            raise ValueError(f"prefetch must be one of {PREFETCH}, not {prefetch!r}")
        if graphs and self.device.type != "cuda":
            raise UserError("CUDA graphs need --device cuda")
        if str(batch) not in {str(b) for b in m["decode_batch_buckets"]}:
            raise UserError(f"the artifact has decode programs for batches {m['decode_batch_buckets']}, not {batch}")
        self.backend = "eager" if programs is not None else m["backend"]
        self.config = _Config(json.loads((self.root / "config.json").read_text()))
        self.act = getattr(torch, m["dtype"])
        self.max_len = m["max_context"]
        self.work = wide_dtype(self.act)
        self.batch = batch
        dev = str(self.device)
        dense = load_file(str(self.root / "dense.safetensors"), device=dev)
        self.embed = dense["embed.weight"].to(self.act)
        head = dense["head.weight"]
        # bf16 on a GPU (the kernel accumulates in float32; the official fp32 head is loaded from bf16)
        bf16_head = (head.dtype == torch.bfloat16 and self.work == torch.float32
                     and kernel_fits(batch, self.config.hidden_size, self.device))
        self.head = head if bf16_head else head.to(self.work)
        self.main_head = self.head_of([dense[f"hc_head_{n}"].to(self.work) for n in ("fn", "scale", "base")],
                                      dense["norm.weight"].to(self.work))
        main = [e for e in m["layers"] if e["prefix"].startswith("layers.")]
        bank = ExpertBank(self.root / "experts", list(json.loads((self.root / "bank.json").read_text()).values()))
        ids = [e["layer"] for e in main]
        total = sum(bank.entries[i]["experts"] for i in ids)
        if expert_slots is None:
            expert_slots = m["recipe"].get("expert_slots", 0)
        self.pager: PagedExperts | None = None
        if 0 < expert_slots < total:
            tid2eid = {e["layer"]: load_file(str(self.root / e["weights"]))["ffn.gate.tid2eid"]
                       for e in main if "hash" in e["kind"]}
            self.experts = self.pager = PagedExperts(bank, ids, self.device, expert_slots, tid2eid,
                                                     prefetch != "none", report)
        elif self.device.type == "cuda":
            self.experts = DeviceExperts(bank, ids, self.device, report)
        else:
            self.experts = HostExperts(bank, ids)
        self._packages: dict[str, object] = {}          # AOTInductor packages by path, each loaded once
        engines = None
        if programs is None and m["backend"] in ("tensorrt", "tensorrt-rtx"):
            from .trt_executor import EngineLoader      # TensorRT stays an optional import
            engines = EngineLoader(m, self.root, self.device)
        self.layers = []
        self.fills: list[dict[str, float]] = []          # each cache's empty value, from the manifest
        for i, e in enumerate(main):
            report("loading layers", i, len(main))
            if programs is not None:
                run = programs(e["layer"]).to(self.device)
            elif engines is not None:
                run = engines.layer(e, batch)           # called exactly like a compiled program
            else:
                run = self._package(e["programs"][str(batch)])
            # dict inputs in sorted key order: the order the programs were traced with
            weights = dict(sorted(load_file(str(self.root / e["weights"]), device=dev).items()))
            caches = {name: torch.full([batch, *shape[1:]], float(fill), dtype=getattr(torch, dtype), device=dev)
                      for name, (shape, dtype, fill) in sorted(e["caches"].items())}
            self.fills.append({name: float(fill) for name, (_, _, fill) in e["caches"].items()})
            self.layers.append((run, self.experts.tables[e["layer"]], weights, caches))
        # score-routed layers after the first: predicted as the layer before them starts
        report("loading layers", len(main), len(main))
        predicted = {i: weights for i, (e, (_, _, weights, _)) in enumerate(zip(main, self.layers))
                     if i > 0 and "hash" not in e["kind"]}
        if self.pager is not None and prefetch == "predict" and predicted:
            self.pager.predict_with(RoutePredictor(self.config, predicted, batch, self.device))
        self.chunk = m["recipe"].get("prefill_chunk", 0)
        self.prefill_runs = self._prefill_programs(main, programs, prefill, engines is not None)
        # smaller prefill programs by chunk size, for a prompt's last chunk (the recipe's prefill_buckets);
        # `use_buckets` off pads every chunk to `chunk` tokens (benchmarks compare the two)
        compiled = self.prefill_runs is not None and programs is None
        self.prefill_buckets = self._prefill_bucket_programs(main) if compiled else {}
        self.use_buckets = True
        # ratio-4 layers' caches: their compressor states shift at a block's end, which `rewind` undoes
        self.overlapped = [caches for e, (_, _, _, caches) in zip(main, self.layers)
                           if self.config.compress_ratios[e["layer"]] == 4]
        self.drafter: MTPDraft | None = None
        self.drafted_pass: DraftedPass | None = None      # greedy drafting's pass, decided on the device
        self.recent: torch.Tensor | None = None          # the main model's last streams at the last `window` positions
        # a drafted token's verification: the verification programs on the decode ops (builder/programs/verify.py),
        # or in artifacts built before them the 2-token prefill programs
        verifies = [e.get("verify") for e in main]
        self.verify_decode = compiled and all(verifies)
        self.verify_runs = [self._package(p) for p in verifies] if self.verify_decode else \
            self.prefill_buckets.get(2) or (self.prefill_runs if compiled and self.chunk == 2 else None)
        mtp = [e for e in m["layers"] if e["prefix"].startswith("mtp.") and "prefill" in e]
        if draft and mtp and self.verify_runs is not None and batch == 1:
            layer = mtp[0]["layer"]
            store = DeviceExperts(bank, [layer], self.device) if self.device.type == "cuda" else HostExperts(bank, [layer])
            self.drafter = MTPDraft(self, mtp[0], store)
            self.drafted_pass = DraftedPass(self)
            self.recent = torch.zeros(1, self.config.sliding_window, self.config.hc_mult, self.config.hidden_size,
                                      dtype=self.act, device=dev)
        self.tokens = torch.zeros(batch, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(batch, dtype=torch.int64, device=dev)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.pick = GreedyPick(batch, self.head.size(0), self.device)    # the greedy token, on the device
        self.budget_gib = m["recipe"].get("memory_budget_gib")
        if self.device.type == "cuda":
            self._check_budget()
        # Only the kernels' path is captured: eager modules and float32/float64 programs run the ops' oracles,
        # which copy host constants (forbidden while capturing); float32 is the exact gate, not the fast path.
        self.capturable = programs is None and self.act == torch.bfloat16
        self.prefill_graphs: dict[int, tuple] = {}       # prefill sizes captured as CUDA graphs (_capture_prefill)
        self.verify_graph: tuple | None = None           # the drafts' verification, likewise
        self._undo: tuple | None = None                  # what `rewind` puts back (`verify`)
        if graphs and self.capturable:
            self._capture()
            self._capture_prefill(report)

    def _prefill_programs(self, main: list[dict], programs, prefill, engines: bool) -> list | None:
        """One prefill program per main layer (modules from `prefill`, or the artifact's packages), or None
        where there are none: then the prompt goes through the decode step token by token."""
        if programs is not None:
            return [prefill(e["layer"]).to(self.device) for e in main] if prefill is not None else None
        if engines or self.batch != 1 or not all("prefill" in e for e in main):
            return None
        return [self._package(e["prefill"]["program"]) for e in main]

    def _prefill_bucket_programs(self, main: list[dict]) -> dict[int, list]:
        """{size: one prefill program per main layer} for each of the artifact's smaller prefill sizes."""
        by_size: dict[int, list] = {}
        for e in main:
            for b in e["prefill"].get("buckets", []):
                by_size.setdefault(b["chunk"], []).append(self._package(b["program"]))
        return {size: runs for size, runs in sorted(by_size.items()) if len(runs) == len(main)}

    def _package(self, path: str):
        """The artifact's AOTInductor package at `path`, loaded once; on a GPU with the single-threaded
        runner, which a capturing stream allows (module docstring)."""
        if path not in self._packages:
            self._packages[path] = torch._inductor.aoti_load_package(
                str(self.root / path), run_single_threaded=self.device.type == "cuda")
        return self._packages[path]

    def _check_budget(self) -> None:
        """Weights, expert slots and caches are all allocated by now: refuse if they exceed the recipe's
        memory budget, rather than run into it mid-generation."""
        used = torch.cuda.memory_allocated(self.device)
        if self._past_budget(used):
            raise UserError(f"loading took {used / 2**30:.1f} GiB of device memory, above the recipe's budget of "
                            f"{self.budget_gib:g} GiB: run with fewer --expert-slots (or without --draft)")

    def _past_budget(self, nbytes: int) -> bool:
        """Whether `nbytes` of device memory exceed the recipe's memory budget (none: never)."""
        return self.budget_gib is not None and nbytes > self.budget_gib * 2**30

    def _cache_sets(self) -> list[tuple[dict[str, torch.Tensor], dict[str, float]]]:
        """Every cache with its empty value: the layers', then the drafter's and the streams it reads."""
        sets = [(caches, fills) for (_, _, _, caches), fills in zip(self.layers, self.fills)]
        if self.drafter is not None:
            sets += [(self.drafter.caches, self.drafter.fills), ({"recent": self.recent}, {"recent": 0.0})]
        return sets

    def reset(self, batch: int = 1) -> None:
        """Empty every cache in place (a captured graph keeps pointing at the same storage)."""
        if batch != self.batch:
            raise ValueError(f"this model runs decode batch {self.batch}")
        for caches, fills in self._cache_sets():
            for name, t in caches.items():
                t.fill_(fills[name])

    def save_caches(self) -> list[dict[str, torch.Tensor]]:
        """A copy of every cache in host memory (pinned on a GPU): a conversation's state, which `load_caches`
        puts back (at Flash size and 64K context about 0.47 GB)."""
        pin = self.device.type == "cuda"
        saved = [{name: torch.empty(t.shape, dtype=t.dtype, pin_memory=pin).copy_(t, non_blocking=pin)
                  for name, t in caches.items()} for caches, _ in self._cache_sets()]
        if pin:
            torch.cuda.synchronize(self.device)
        return saved

    def load_caches(self, saved: list[dict[str, torch.Tensor]]) -> None:
        """Every cache as `save_caches` copied it, written in place (captured graphs keep their storage)."""
        for (caches, _), state in zip(self._cache_sets(), saved):
            for name, t in caches.items():
                t.copy_(state[name], non_blocking=self.device.type == "cuda")

    def _step(self) -> torch.Tensor:
        """One decode step over the static buffers: logits [B, vocab] in the working dtype."""
        # every stream starts as the token's embedding: one gather over the ids expanded (a view), no repeat
        h = self.embed[self.tokens[:, None].expand(-1, self.config.hc_mult)]
        for i, (run, table, weights, caches) in enumerate(self.layers):
            if self.pager is not None:
                self.pager.before_layer(i, h)
            h = run(h, self.positions, self.tokens, table, caches, weights)
        self._keep_recent(self.positions, h)
        return self._logits(h)

    def _keep_recent(self, positions: torch.Tensor, h: torch.Tensor) -> None:
        """The main model's last streams h [n, hc, d] of one sequence at `positions` [n] into the drafter's ring
        of inputs (`recent`, where the artifact drafts): one launch for the slots, one for the rows. (Until session
        57 the verification rewrote the whole ring through `ring_update` for its two rows: about twelve launches
        and, computed at Flash size, some 25 MB read and written a pass.)"""
        if self.recent is not None:
            self.recent[0].index_copy_(0, positions % self.recent.size(1), h)

    def head_of(self, hc: list[torch.Tensor], norm: torch.Tensor) -> Head:
        """A head's hc_head weights and norm, with hc_head in `dsv4::hc_pre_norm`'s form
        (`plugins.hc_pre.head_as_hc_pre`) for decode steps on a GPU, where the kernels make the head's input in
        two launches (torch ran about twenty: the step's largest group of small kernels,
        bench/results/profile-decode-flash8-h200.json); None where they do not serve (CPU, float32, or batches
        past hc_pre's rows)."""
        from plugins.hc_pre import head_as_hc_pre, supports_norm
        padded = head_as_hc_pre(*hc)
        probe = torch.empty(1, self.config.hc_mult, padded[0].size(1) // self.config.hc_mult,
                            dtype=self.act, device=self.device)
        fits = self.head.dtype == torch.bfloat16 and supports_norm(probe, padded[0])    # the bf16 head's kernel
        return Head(hc, norm, padded if fits else None)

    def _logits(self, h: torch.Tensor, head: Head | None = None) -> torch.Tensor:
        """hc streams h [B, hc, d] -> logits [B, vocab] in the working dtype, through `head` (the MTP block's)
        or the model's own, and the model's head matrix."""
        head = head or self.main_head
        eps = self.config.rms_norm_eps
        # the decode steps' kernels wherever they take the rows (a drafted token's verification: 2), so that the
        # verification's logits are the steps' (no Sinkhorn iterations: comb unused)
        if head.hc_pre is not None and kernel_fits(h.size(0), h.size(-1), h.device):
            y = torch.ops.dsv4.hc_pre_norm(h[:, None], *head.hc_pre, head.norm, eps, self.config.hc_eps, 0)[0]
            return head_logits(y[:, 0], self.head)
        y = rms_norm(hc_head(h[:, None], *head.hc, self.config)[:, 0], head.norm, eps)
        return head_logits(wide(y), self.head)

    def _prefill_chunk(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Feed ids [1, n] (n <= chunk) at positions start.. through the prefill programs; float32 logits
        [1, vocab] of the last."""
        n = ids.size(1)
        size, runs = self.chunk, self.prefill_runs
        if self.use_buckets:                             # the smallest program that holds the n tokens
            size, runs = next(((c, r) for c, r in self.prefill_buckets.items() if c >= n), (size, runs))
        return self._prefill_run(ids, start, size, lambda *inputs: self._prefill_through(runs, *inputs),
                                 self.prefill_graphs.get(size))

    def _prefill_run(self, ids: torch.Tensor, start: int, size: int, through, graphed: tuple | None) -> torch.Tensor:
        """through(ids padded to `size`, start, n) for ids [1, n] at positions start.. (`_prefill_through` or
        `_verify_through`): by replaying `graphed` (`_capture_size`) with its static inputs refilled, or
        launched; float32 logits."""
        n = ids.size(1)
        if graphed is not None:
            graph, padded, start_t, n_t, logits = graphed
            padded.zero_()
            padded[:, :n] = ids
            start_t.fill_(start)
            n_t.fill_(n)
            graph.replay()
            return logits.float()
        padded = torch.zeros(1, size, dtype=torch.int64, device=self.device)          # padding: token 0
        padded[:, :n] = ids
        start_t = torch.tensor([start], device=self.device)
        n_t = torch.tensor([n], device=self.device)
        return through(padded, start_t, n_t).float()

    def _prefill_through(self, runs: list, padded: torch.Tensor, start_t: torch.Tensor,
                         n_t: torch.Tensor, every: bool = False) -> torch.Tensor:
        """The prefill programs `runs` over ids padded [1, C] at positions start_t.., n_t of them real: logits
        [1, vocab] of the last real one (`every`: [C, vocab] of each), in the working dtype (no host value: a
        CUDA graph can capture it)."""
        h = self.embed[padded[:, :, None].expand(-1, -1, self.config.hc_mult)]      # [1, C, hc, d]
        for (_, table, weights, caches), run in zip(self.layers, runs):
            h = run(h, start_t, n_t, padded, table, caches, weights)
        if self.recent is not None:                      # the drafter's input at these positions
            self.recent.copy_(ring_update(self.recent, h, start_t, n_t))
        return self._logits(h[0] if every else h.index_select(1, n_t - 1)[:, 0])

    def _verify_through(self, padded: torch.Tensor, start_t: torch.Tensor, n_t: torch.Tensor) -> torch.Tensor:
        """A token and its draft, ids padded [1, 2] at positions start_t and start_t + 1, through the verification
        programs (or the 2-token prefill programs where the artifact has none): logits [2, vocab] of both, in
        the working dtype (no host value: a CUDA graph can capture it)."""
        if not self.verify_decode:
            return self._prefill_through(self.verify_runs, padded, start_t, n_t, every=True)
        ids = padded[0]
        pos = start_t + torch.arange(2, device=ids.device)
        h = self.embed[ids[:, None].expand(-1, self.config.hc_mult)]                # [2, hc, d]
        for (_, table, weights, caches), run in zip(self.layers, self.verify_runs):
            h = run(h, pos, ids, table, caches, weights)
        self._keep_recent(pos, h)                        # both rows (a rejected draft's is written again)
        return self._logits(h)

    def _captured(self, fn) -> tuple[torch.cuda.CUDAGraph, object]:
        """fn() captured as a CUDA graph, after two warm-up runs on a side stream (module loads, first-run
        setup, allocator pools) whose cache writes are then emptied; the graph and fn's outputs, which each
        replay rewrites. Each graph keeps its own memory pool: a shared one could hand one graph's output to
        another's intermediates."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        self.reset(self.batch)                           # the warm-up wrote the caches
        graph = torch.cuda.CUDAGraph()
        # No garbage collection while capturing: collecting an old model would free its AOTInductor
        # constants with cudaFree, which a capturing stream forbids (measured on the H200).
        gc.collect()
        gc.disable()
        try:
            with torch.cuda.graph(graph):
                out = fn()
        finally:
            gc.enable()
        return graph, out

    def _capture(self) -> None:
        def step():
            out = self._step()
            return out, self.pick(out)                   # the greedy pick, on the device (decode_greedy)
        self.graph, (self._out, self._next) = self._captured(step)

    def _capture_prefill(self, report: Progress = no_progress) -> None:
        """Each prefill size (the buckets and the whole chunk) as a CUDA graph of its own over static inputs, so
        a chunk's prefill is one replay instead of the programs' launches from the host (no op of theirs
        synchronises: plugins.ops DECODE_ROWS). A size that fails to capture runs plainly, with a warning."""
        sizes = dict(self.prefill_buckets)
        if self.prefill_runs is not None:
            sizes[self.chunk] = self.prefill_runs
        for done, (size, runs) in enumerate(sizes.items()):
            report("capturing prefill graphs", done, len(sizes) + 1)
            graphed = self._capture_size(size, lambda *inputs, runs=runs: self._prefill_through(runs, *inputs),
                                         f"the {size}-token prefill programs")
            if graphed is not None:
                self.prefill_graphs[size] = graphed
        if self.drafter is not None:                    # a drafted token's verification: every row's logits
            self.verify_graph = self._capture_size(2, self._verify_through, "the verification of drafts")
            self.drafter.capture()
            passes = self.drafted_pass
            for ends in passes.forms():
                graphed = self._graphed(lambda ends=ends: passes.compute(ends),
                                        "the greedy drafted pass" + (" ending a block" if ends else ""))
                if graphed is not None:
                    passes.graphs[ends] = graphed
        report("capturing prefill graphs", len(sizes) + 1, len(sizes) + 1)

    def _capture_size(self, size: int, through, what: str) -> tuple | None:
        """through(padded ids, start, n) (`_prefill_through` of some programs, or `_verify_through`) of `size`
        tokens as a CUDA graph over static inputs: (graph, padded ids, start, n, logits), or None with a warning
        where it does not capture or its memory would pass the budget."""
        padded = torch.zeros(1, size, dtype=torch.int64, device=self.device)
        start_t = torch.zeros(1, dtype=torch.int64, device=self.device)
        n_t = torch.full((1,), size, dtype=torch.int64, device=self.device)
        graphed = self._graphed(lambda: through(padded, start_t, n_t), what)
        return None if graphed is None else (graphed[0], padded, start_t, n_t, graphed[1])

    def _graphed(self, fn, what: str) -> tuple | None:
        """fn() as a CUDA graph (`_captured`): (graph, fn's outputs), or None with a warning where it does not
        capture or its memory would pass the budget (`what` runs plainly then)."""
        try:
            graph, out = self._captured(fn)
        except RuntimeError as e:
            self._uncaptured(what, e)
            return None
        torch.cuda.empty_cache()                     # the warm-ups' blocks: the graph has a pool of its own
        reserved = torch.cuda.memory_reserved(self.device)
        if self._past_budget(reserved):
            del graph, out                           # its pool goes back; the programs run plainly
            torch.cuda.empty_cache()
            warnings.warn(f"{what} run without a CUDA graph: its memory would take the device to "
                          f"{reserved / 2**30:.1f} GiB, past the recipe's {self.budget_gib:g}")
            return None
        return graph, out

    def _uncaptured(self, what: str, error: RuntimeError) -> None:
        """After `what` failed to capture: empty the caches a warm-up may have written, and say it runs plainly."""
        self.reset(self.batch)
        cause = str(error).splitlines()[0] if str(error) else type(error).__name__
        warnings.warn(f"{what} run without a CUDA graph (they did not capture: {cause})")

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Decode tokens [B] at positions [B]; float32 logits [B, vocab] on the model's device."""
        if self.pager is not None:
            self.pager.begin_step(tokens.tolist())
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        if self.graph is not None:
            self.graph.replay()
            logits = self._out
        else:
            logits = self._step()
        if self.pager is not None:
            self.pager.follow()                 # prefetch predicted experts while the step runs
            self.pager.end_step([caches["routed"] for _, _, _, caches in self.layers])
        return logits.float()

    @torch.inference_mode()
    def decode_greedy(self, token: int, position: int, count: int) -> Iterator[int]:
        """The `count` greedy tokens after `token` at `position` (batch 1; closing the iterator stops early):
        what `step` and the argmax of its logits give one at a time. The device runs a step ahead of the
        host: each step's token is picked on the device and fed to the next step there, and the next step
        is queued before the host reads this one, so the host's work between steps (reading the token,
        copying it in, launching the graph) no longer leaves the GPU idle. The pager needs each token on
        the host before its step (hash-routed prefetch), so it keeps the step-by-step loop. A step queued
        past an early stop has fed the last token read: `Generation.fed` counts it."""
        if self.pager is not None or self.batch != 1:
            for i in range(count):
                token = int(self.step(torch.tensor([token]), torch.tensor([position + i]))[0].argmax())
                yield token
            return
        cuda = self.device.type == "cuda"
        self.tokens.fill_(token)
        self.positions.fill_(position)
        picked = torch.empty(max(count, 0), dtype=torch.int64, pin_memory=cuda)

        def queue(i: int) -> torch.cuda.Event | None:
            if self.graph is not None:
                self.graph.replay()
            else:
                self._next = self.pick(self._step())
            self.tokens.copy_(self._next)                # the next step's input, never through the host
            self.positions.add_(1)
            picked[i].copy_(self._next[0], non_blocking=cuda)
            if not cuda:
                return None
            done = torch.cuda.Event()
            done.record()
            return done

        done = queue(0) if count > 0 else None
        for i in range(count):
            ahead = queue(i + 1) if i + 1 < count else None
            if done is not None:
                done.synchronize()
            yield int(picked[i])
            done = ahead

    @torch.inference_mode()
    def verify(self, tokens: list[int], start: int) -> torch.Tensor:
        """Feed two tokens, the last one drawn and a draft after it, at positions start and start + 1 (one
        pass over the weights): float32 logits [2, vocab] on the model's device, each row the next token's.
        Where the draft ends a ratio-4 block, the compressors' states as they were before it are kept for
        `rewind`."""
        if len(tokens) != 2:
            raise ValueError(f"one draft is verified at a time, not {len(tokens) - 1}")
        if start + 2 > self.max_len:
            raise ValueError(f"position {start + 2} exceeds the artifact's context of {self.max_len}")
        if self.pager is not None:
            self.pager.begin_step([])       # as a prefill chunk: the last step's misses admitted
        # ratio 4 overlaps blocks: its state's first rows hold the previous block, replaced as a block ends; the
        # token at `start` ends none when the draft does (only one of two neighbours ends a block of 4)
        self._undo = (start + 1, [{k: t.clone() for k, t in rows.items()} for rows in self.overlap_rows()]) \
            if self.draft_ends_block(start) else None
        return self._prefill_run(torch.tensor([tokens], device=self.device), start, 2, self._verify_through,
                                 self.verify_graph)

    def draft_ends_block(self, q: int) -> bool:
        """Whether a draft at q + 1 ends a ratio-4 block, shifting those layers' compressor states (`overlap_rows`),
        where the model has any: what a rejected draft must put back."""
        return bool(self.overlapped) and (q + 2) % 4 == 0

    def overlap_rows(self) -> list[dict[str, torch.Tensor]]:
        """The ratio-4 layers' compressor states' first rows (the previous block's; views), which the token ending
        a block replaces: what `rewind` (a copy of them) and greedy's drafted pass put back after a rejected draft."""
        return [{k: c[k][:, :4] for k in OVERLAP_STATES} for c in self.overlapped]

    def rewind(self, position: int) -> None:
        """Forget the token fed at `position`, the last one fed (a rejected draft; `verify`): its rows elsewhere
        are overwritten when that position is fed again, but a ratio-4 block it ended shifted the compressors'
        states, which are put back."""
        undo, self._undo = self._undo, None
        if undo is not None and undo[0] == position:
            for caches, kept in zip(self.overlapped, undo[1]):
                for name, rows in kept.items():
                    caches[name][:, :4] = rows

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Feed ids [1, s] at positions start.. (in prefill chunks, or one token at a time); float32 logits
        [1, vocab] of the last, on the CPU."""
        if start + ids.size(1) > self.max_len:
            raise ValueError(f"position {start + ids.size(1)} exceeds the artifact's context of {self.max_len}")
        if self.prefill_runs is not None and ids.size(1) > 1:
            if self.pager is not None:
                self.pager.begin_step([])   # the last step's misses admitted, evicted experts repointed
            for c0 in range(0, ids.size(1), self.chunk):
                logits = self._prefill_chunk(ids[:, c0:c0 + self.chunk].to(self.device), start + c0)
            return logits.cpu()
        for i in range(ids.size(1)):
            logits = self.step(ids[:, i], torch.tensor([start + i]))
        return logits.cpu()
