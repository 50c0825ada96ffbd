"""`dsv4 build`: checkpoint + recipe -> artifact, as a chain of stages with their own outputs.

    experts   routed experts of each layer -> experts/layer-NNN.experts (the expert bank)
    weights   each layer's dense weights, in its program's form -> weights/layer-NNN.safetensors
    dense     embedding, final norm, hc head, vocabulary head -> dense.safetensors
    programs  one decode program per layer kind and batch bucket -> programs/KIND-bB.pt2 (AOTInductor),
              and one prefill program per main-layer kind for chunks of `prefill_chunk` tokens of one
              sequence -> programs/KIND-prefill-cC.pt2, and one for each smaller size in `prefill_buckets`
              (a prompt's last chunk); with `draft_tokens` (speculative decoding) a verification program
              per main-layer kind -> programs/KIND-verify.pt2 (a token and its draft in one pass on the
              decode ops, builder/programs/verify.py) and the MTP block's own prefill programs of 2 and
              `sliding_window` tokens; programs hold no weights
              (bound at load time), so every layer of a kind shares one.
              TensorRT backends: programs/KIND.onnx and engines/KIND.engine, one profile per bucket
    manifest  manifest.json: config, recipe, versions, layer table, every file's sha256

Resumable: each output is keyed by a digest of its inputs (checkpoint headers, config, recipe, code);
a rebuild links unchanged outputs from the previous artifact instead of making them again. The expert
bank, most of a full build's bytes and time, is keyed by the checkpoint and the bank's own code only: a
new recipe, torch or program code repacks nothing. The new
artifact is assembled in `<out>.partial` and swapped in at the end, so a failed build never leaves a
half-written artifact where a good one was.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import multiprocessing
import os
import shutil
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

import plugins
from plugins.grouped_linear import wo_a_as_bf16
from runtime.errors import UserError
from runtime.manifest import Machine, arch_targeted, write_manifest
from runtime.trt_support import load_tensorrt

from .backends import trt_program
from .checkpoint import Checkpoint
from .expert_bank import write_layer_bank
from .programs import decode, prefill, verify
from .recipe import Recipe

STATE = "build-state.json"
VERIFY = "verify"             # a program job's `chunk` for the verification program (`_compile_program`)
TRT_BACKENDS = ("tensorrt", "tensorrt-rtx")
DENSE = ["embed.weight", "head.weight", "norm.weight", "hc_head_fn", "hc_head_base", "hc_head_scale"]
Progress = Callable[[str, int, int], None]


@dataclass
class BuildSummary:
    out: Path
    stage_seconds: dict[str, float] = field(default_factory=dict)
    made: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)


def _code_digest() -> str:
    """Digest of the code that shapes the outputs: the layer programs, the reference functions they reuse
    (routing, RoPE tables) and the ops they call."""
    h = hashlib.sha256()
    reference = Path(decode.__file__).parents[1] / "reference"
    programs = Path(decode.__file__).parent
    for path in sorted([*programs.glob("*.py"), *reference.glob("*.py"), *Path(plugins.__file__).parent.glob("*.py")]):
        h.update(path.read_bytes())
    return h.hexdigest()


def _bank_code_digest() -> str:
    """Digest of the code that shapes the expert bank's bytes: its writer, the checkpoint reader and the
    kernels' expert layout (`pack_expert` and what it calls), not the rest of plugins/moe_experts.py."""
    from plugins import moe_experts
    h = hashlib.sha256()
    for path in (Path(__file__).with_name("expert_bank.py"), Path(__file__).with_name("checkpoint.py")):
        h.update(path.read_bytes())
    for fn in (moe_experts.expert_nbytes, moe_experts.bank_parts, moe_experts.pack_expert):
        h.update(inspect.getsource(fn).encode())
    return h.hexdigest()


def _source_digest(ckpt: Checkpoint) -> str:
    entries = sorted((n, e.shard, e.dtype, e.shape, e.start, e.end) for n, e in ckpt.entries.items())
    sizes = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in ckpt.folder.glob("*.safetensors"))
    return hashlib.sha256(json.dumps([entries, sizes, ckpt.config.digest()], default=str).encode()).hexdigest()


def _layers(cfg) -> list[int]:
    """Every block, MTP included (MTP blocks continue the numbering)."""
    return list(range(cfg.num_hidden_layers + cfg.num_nextn_predict_layers))


def _drafts(recipe, cfg) -> bool:
    """Whether the artifact drafts (speculative decoding): the recipe asks for it and the model has an MTP block."""
    return bool(recipe.draft_tokens and cfg.num_nextn_predict_layers)


def _prefill_sizes(recipe, cfg) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The prefill sizes below the whole chunk: the main layers' (the recipe's buckets; a drafted token's
    verification has a program of its own, builder/programs/verify.py), and the MTP block's where it drafts
    (the positions a verification settles, 1 + draft_tokens, and the sliding window: the block's cache filled
    over a prompt's last tokens)."""
    if not _drafts(recipe, cfg):
        return recipe.prefill_buckets, ()
    return recipe.prefill_buckets, tuple(sorted({1 + recipe.draft_tokens, cfg.sliding_window}))


def _compile_program(cfg, layer: int, weights: dict, act: torch.dtype, max_len: int, batch: int,
                     device: str, path: Path, chunk: int | str = 0) -> None:
    """Export and compile the program of `layer`'s kind, traced with `weights` (any layer of the kind): the
    decode step, with `chunk` the prefill of that many tokens, or with chunk "verify" a drafted token's
    verification (two tokens of one sequence)."""
    caches = decode.new_caches(cfg, layer, batch, max_len, act, device)
    table = torch.zeros(cfg.n_routed_experts, dtype=torch.int64, device=device)  # only its shape is traced
    pos = torch.zeros(batch, dtype=torch.int64, device=device)
    weights = {k: v.to(device) for k, v in weights.items()}
    if chunk == VERIFY:
        program = verify.VerifyLayer(cfg, layer, act, max_len).to(device)
        h = torch.zeros(2, cfg.hc_mult, cfg.hidden_size, dtype=act, device=device)
        two = torch.zeros(2, dtype=torch.int64, device=device)
        args = (h, two, two.clone(), table, caches, weights)
    elif chunk:
        program = prefill.make_prefill_program(cfg, layer, act, max_len, chunk).to(device)
        h = torch.zeros(batch, chunk, cfg.hc_mult, cfg.hidden_size, dtype=act, device=device)
        ids = torch.zeros(batch, chunk, dtype=torch.int64, device=device)
        args = (h, pos, torch.full_like(pos, chunk), ids, table, caches, weights)
    else:
        program = decode.make_program(cfg, layer, act, max_len).to(device)
        h = torch.zeros(batch, cfg.hc_mult, cfg.hidden_size, dtype=act, device=device)
        args = (h, pos, pos.clone(), table, caches, weights)
    exported = torch.export.export(program, args)
    # keep eager's rounding of every low-precision intermediate: the reference (and DeepSeek's code) rounds
    # after each op, where fused kernels would otherwise carry float32 through and drift from it
    with torch._inductor.config.patch(emulate_precision_casts=True):
        torch._inductor.aoti_compile_and_package(exported, package_path=str(path))


def _compile_job(job: tuple) -> None:
    """One program compile from plain arguments (it may run in a child process): (checkpoint folder, layer,
    dtype name, max_len, batch, device, output path, prefill chunk, 0 or VERIFY)."""
    folder, layer, dtype, max_len, batch, device, path, chunk = job
    ckpt = Checkpoint(folder)
    act = getattr(torch, dtype)
    _compile_program(ckpt.config, layer, decode.layer_weights(ckpt.config, ckpt.get, layer, act), act, max_len,
                     batch, device, Path(path), chunk)


def _compile_job_in_child(job: tuple) -> None:
    """_compile_job with its failure turned into text: torch's export errors hold frames, which cannot be
    pickled back to the parent (an H200 build reported 'cannot pickle frame' instead of the real error)."""
    try:
        _compile_job(job)
    except Exception:
        raise RuntimeError(f"compiling {Path(job[6]).name}: {traceback.format_exc()}") from None


def _compile_all(jobs: list[tuple], progress: Progress | None) -> None:
    """Run the compiles, several at once where the machine has the cores (each compile also uses a few)."""
    workers = min(len(jobs), (os.cpu_count() or 1) // 4)
    if workers <= 1:
        for n, job in enumerate(jobs):
            _compile_job(job)
            if progress:
                progress("programs", n + 1, len(jobs))
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for n, done in enumerate(as_completed([pool.submit(_compile_job_in_child, job) for job in jobs])):
            done.result()
            if progress:
                progress("programs", n + 1, len(jobs))


def _cache_spec(cfg, layer: int, act: torch.dtype, max_len: int) -> dict:
    """Shapes (batch 1; dim 0 is the batch), dtypes and fill values of a layer's caches."""
    return {name: [list(t.shape), str(t.dtype).removeprefix("torch."), "-inf" if name.endswith("_score") else "0"]
            for name, t in decode.new_caches(cfg, layer, 1, max_len, act, "meta").items()}


def _check_device(recipe: Recipe) -> dict[str, str]:
    """Refuse a build this machine cannot make; return the versions the backend adds to the manifest."""
    if recipe.backend in TRT_BACKENDS:
        # TensorRT-RTX compiles for its targets without a GPU; full TensorRT times kernels on the GPU it targets
        if recipe.backend == "tensorrt" and not torch.cuda.is_available():
            raise UserError("backend 'tensorrt' builds engines on the GPU they target: this machine has no CUDA "
                            "GPU (build on the target box, or use backend 'tensorrt-rtx' for sm_120a/sm_121a)")
        if recipe.dtype != "bfloat16":
            raise UserError(f"backend {recipe.backend!r} builds bfloat16 programs (dtype {recipe.dtype!r} works in "
                            "float64, which TensorRT has no kernels for); set build.dtype = \"bfloat16\"")
        return {recipe.backend: load_tensorrt(recipe.backend).__version__}
    if recipe.backend not in ("aoti", "eager"):
        raise UserError(f"backend {recipe.backend!r} is not implemented by this build; use 'aoti' or 'eager'")
    if recipe.device == "cuda" and recipe.backend == "aoti" and not torch.cuda.is_available():
        raise UserError("an aoti build for cuda compiles on the GPU it targets: this machine has no CUDA GPU "
                        "(build on the target box, or use a cpu recipe such as recipes/tiny.toml)")
    if recipe.device == "cuda" and recipe.backend == "aoti":
        # AOTInductor compiles its generated kernels for this GPU only: an artifact built here for another
        # architecture would load there and fail in its first program
        here = Machine.this().gpu_arch
        if not arch_targeted(recipe.gpu_archs, here):
            raise UserError(f"an aoti build compiles for the GPU it runs on: this GPU is {here}, the recipe targets "
                            f"{', '.join(recipe.gpu_archs)} (build on the target box, or set build.gpu_archs)")
    return {}


def engine_file(kind: str) -> str:
    return f"engines/{kind}.engine"


def _programs(backend: str, kind: str, buckets, program_file) -> dict[str, str]:
    """Decode batch bucket -> the file the runtime loads for it."""
    if backend == "aoti":
        return {str(b): program_file(kind, b) for b in buckets}
    if backend in TRT_BACKENDS:
        return {str(b): engine_file(kind) for b in buckets}
    return {}


def _engine_entry(backend: str, kind: str, buckets, root: Path) -> dict:
    """A TensorRT layer's engine: its ONNX, the profile index of each bucket and its I/O tensors."""
    if backend not in TRT_BACKENDS:
        return {}
    onnx_rel = f"programs/{kind}.onnx"
    profiles = {str(b): i for i, b in enumerate(buckets)}
    return {"engine": {"file": engine_file(kind), "onnx": onnx_rel, "profiles": profiles,
                       **trt_program.engine_io(root / onnx_rel)}}


def build(recipe: Recipe, checkpoint: str | Path, out: str | Path,
          progress: Progress | None = None) -> BuildSummary:
    backend_versions = _check_device(recipe)
    out = Path(out)
    ckpt = Checkpoint(checkpoint)
    cfg = ckpt.config
    act = getattr(torch, recipe.dtype)
    max_len = recipe.max_context
    summary = BuildSummary(out)
    key_base = {"recipe": asdict(recipe), "code": _code_digest(), "torch": torch.__version__, **backend_versions}
    source = {"source": _source_digest(ckpt)}
    bank_base = {"bank_code": _bank_code_digest()}
    old_state = json.loads((out / STATE).read_text()) if (out / STATE).is_file() else {}
    new_state: dict[str, str] = {}
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    for folder in ("experts", "weights", "programs", *(("engines",) if recipe.backend in TRT_BACKENDS else ())):
        (partial / folder).mkdir(parents=True)

    def stage(rel: str, make: Callable[[Path], object], base: dict | None = None, **key) -> object:
        digest = hashlib.sha256(json.dumps({**(key_base if base is None else base), **key, "file": rel},
                                           sort_keys=True, default=str).encode()).hexdigest()
        new_state[rel] = digest
        target = partial / rel
        previous = out / rel
        if old_state.get(rel) == digest and previous.is_file():
            os.link(previous, target)
            summary.reused.append(rel)
            return None
        result = make(target)
        summary.made.append(rel)
        return result

    def timed(name: str, items: list, one: Callable, threads: int = 1) -> None:
        """Run `one` over `items` (up to `threads` at once, for stages whose work releases the GIL), with
        progress as each completes and the stage's time; the first failure cancels what has not started."""
        t0 = time.time()
        with ThreadPoolExecutor(max(1, threads)) as pool:
            futures = [pool.submit(one, item) for item in items]
            try:
                for n, done in enumerate(as_completed(futures)):
                    done.result()
                    if progress:
                        progress(name, n + 1, len(items))
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        summary.stage_seconds[name] = time.time() - t0

    old_bank = json.loads((out / "bank.json").read_text()) if (out / "bank.json").is_file() else {}
    layers = _layers(cfg)
    bank = {}

    def experts(layer: int) -> None:
        entry = stage(f"experts/layer-{layer:03d}.experts",
                      lambda p: write_layer_bank(ckpt, layer, p, prefix=decode.layer_prefix(cfg, layer)),
                      base=bank_base, prefix=decode.layer_prefix(cfg, layer), **source)
        bank[str(layer)] = entry if entry is not None else old_bank[str(layer)]
    # layers side by side: reading, hashing and writing release the GIL (builder/expert_bank.py)
    timed("experts", layers, experts, threads=min(len(layers), os.cpu_count() or 1, 8))
    bank = {str(layer): bank[str(layer)] for layer in layers}   # in layer order, whatever order they finished

    def weights_file(layer: int) -> str:
        return f"weights/layer-{layer:03d}.safetensors"

    def weights(layer: int) -> None:
        def make(p: Path) -> None:
            w = decode.layer_weights(cfg, ckpt.get, layer, act)
            if recipe.backend in TRT_BACKENDS:      # their graphs take wo_a in bf16 (no grouped FP8 plugin)
                w = wo_a_as_bf16(w, act)
            save_file({k: v for k, v in w.items() if k not in decode.SHARED_WEIGHTS}, str(p))
        stage(weights_file(layer), make, **source)
    timed("weights", layers, weights)

    timed("dense", ["dense.safetensors"], lambda rel: stage(
        rel, lambda p: save_file({k: ckpt.get(k).contiguous() for k in DENSE}, str(p)), **source))

    kinds: dict[str, int] = {}                       # kind -> the first layer of it (traced with its weights)
    for layer in layers:
        kinds.setdefault(decode.program_kind(cfg, layer), layer)
    buckets = recipe.decode_batch_buckets

    def program_file(kind: str, batch: int) -> str:
        return f"programs/{kind}-b{batch}.pt2"

    # Program compiles are collected, then run side by side (each in its own process on a machine with cores
    # to spare): they are the build's longest stage and independent of each other.
    compiles: list[tuple] = []

    def program(item: tuple[str, int]) -> None:
        kind, batch = item
        stage(program_file(kind, batch), lambda p: compiles.append(
            (str(ckpt.folder), kinds[kind], recipe.dtype, max_len, batch, recipe.device, str(p), 0)),
            config=cfg.digest(), kind=kind, batch=batch)
    chunk = recipe.prefill_chunk

    def prefill_file(kind: str, size: int = chunk) -> str:
        return f"programs/{kind}-prefill-c{size}.pt2"

    def verify_file(kind: str) -> str:
        return f"programs/{kind}-verify.pt2"

    def prefill_program(kind: str, size: int | str) -> None:
        stage(verify_file(kind) if size == VERIFY else prefill_file(kind, size), lambda p: compiles.append(
            (str(ckpt.folder), kinds[kind], recipe.dtype, max_len, 1, recipe.device, str(p), size)),
            config=cfg.digest(), kind=kind, chunk=size)
    main_sizes, mtp_sizes = _prefill_sizes(recipe, cfg)
    verifies = (VERIFY,) if _drafts(recipe, cfg) else ()
    if recipe.backend == "aoti":
        for item in [(k, b) for k in kinds for b in buckets]:
            program(item)
        # prefill for one sequence at a time; the MTP block's only where it drafts (speculative decoding), and
        # then the main layers' verification of its drafts
        for kind, layer in kinds.items():
            for size in mtp_sizes if decode.is_mtp(cfg, layer) else (chunk, *main_sizes, *verifies):
                prefill_program(kind, size)
        t0 = time.time()
        _compile_all(compiles, progress)
        summary.stage_seconds["programs"] = time.time() - t0

    def engine(kind: str) -> None:
        layer, onnx_rel = kinds[kind], f"programs/{kind}.onnx"
        stage(onnx_rel, lambda p: trt_program.export_kind(cfg, ckpt.get, layer, act, max_len, buckets, p),
              config=cfg.digest(), kind=kind, buckets=list(buckets), export=export_code)
        stage(engine_file(kind), lambda p: trt_program.build_engine(
            recipe.backend, recipe.gpu_archs, buckets, partial / onnx_rel, p, timing_cache),
            config=cfg.digest(), kind=kind, buckets=list(buckets), onnx=new_state[onnx_rel])
    timing_cache = out.with_name(out.name + ".timing-cache")    # outside the artifact: reused by every build
    if recipe.backend in TRT_BACKENDS:
        export_code = trt_program.code_digest()
        timed("programs", list(kinds), engine)

    t0 = time.time()
    def prefill_entry(layer: int) -> dict:
        """The layer's prefill programs in the manifest: the whole chunk's and the smaller sizes' (`buckets`);
        an MTP block's, where it drafts, as buckets only."""
        kind = decode.program_kind(cfg, layer)
        sizes = mtp_sizes if decode.is_mtp(cfg, layer) else main_sizes
        whole = {} if decode.is_mtp(cfg, layer) else {"chunk": chunk, "program": prefill_file(kind)}
        if recipe.backend != "aoti" or not (whole or sizes):
            return {}
        verification = {} if decode.is_mtp(cfg, layer) or not verifies else {"verify": verify_file(kind)}
        return {"prefill": {**whole, "buckets": [{"chunk": size, "program": prefill_file(kind, size)}
                                                 for size in sizes]}, **verification}
    layer_table = [{
        "layer": layer, "prefix": decode.layer_prefix(cfg, layer), "kind": decode.program_kind(cfg, layer),
        "programs": _programs(recipe.backend, decode.program_kind(cfg, layer), buckets, program_file),
        **prefill_entry(layer),
        **_engine_entry(recipe.backend, decode.program_kind(cfg, layer), buckets, partial),
        "weights": weights_file(layer),
        "shared_weights": list(decode.SHARED_WEIGHTS) if decode.is_mtp(cfg, layer) else [],
        "experts": bank[str(layer)]["file"], "caches": _cache_spec(cfg, layer, act, max_len)}
        for layer in layers]
    (partial / "bank.json").write_text(json.dumps(bank, indent=2))
    (partial / "config.json").write_text(json.dumps(cfg.to_json(), indent=2))
    if (ckpt.folder / "tokenizer.json").is_file():
        shutil.copyfile(ckpt.folder / "tokenizer.json", partial / "tokenizer.json")
    (partial / STATE).write_text(json.dumps(new_state, indent=2))
    write_manifest(partial, {
        "model_id": recipe.name, "config_digest": cfg.digest(), "recipe": asdict(recipe),
        "backend": recipe.backend, "device": recipe.device, "gpu_archs": list(recipe.gpu_archs),
        "dtype": recipe.dtype, "max_context": max_len, "decode_batch_buckets": list(buckets),
        "versions": {"torch": torch.__version__.split("+")[0], **backend_versions}, "layers": layer_table,
    })
    summary.stage_seconds["manifest"] = time.time() - t0
    old = out.with_name(out.name + ".old")
    if out.exists():
        out.rename(old)
    partial.rename(out)
    if old.exists():
        shutil.rmtree(old)
    return summary
