"""`dsv4 build`: checkpoint + recipe -> artifact, as a chain of stages with their own outputs.

    experts   routed experts of each layer -> experts/layer-NNN.experts (the expert bank)
    dense     embedding, final norm, hc head, vocabulary head -> dense.safetensors
    programs  one decode layer program per layer (+ MTP) -> programs/layer-NNN.pt2 (AOTInductor)
    manifest  manifest.json: config, recipe, versions, layer table, every file's sha256

Resumable: each output is keyed by a digest of its inputs (checkpoint headers, config, recipe, code);
a rebuild links unchanged outputs from the previous artifact instead of making them again. The new
artifact is assembled in `<out>.partial` and swapped in at the end, so a failed build never leaves a
half-written artifact where a good one was.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

import plugins
from runtime.errors import UserError
from runtime.manifest import write_manifest

from .checkpoint import Checkpoint
from .expert_bank import write_layer_bank
from .programs import decode
from .recipe import Recipe

STATE = "build-state.json"
DENSE = ["embed.weight", "head.weight", "norm.weight", "hc_head_fn", "hc_head_base", "hc_head_scale"]
Progress = Callable[[str, int, int], None]


@dataclass
class BuildSummary:
    out: Path
    stage_seconds: dict[str, float] = field(default_factory=dict)
    made: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)


def _code_digest() -> str:
    """Digest of the code that shapes the outputs: the layer programs and the ops they call."""
    h = hashlib.sha256()
    for path in sorted([Path(decode.__file__), *Path(plugins.__file__).parent.glob("*.py")]):
        h.update(path.read_bytes())
    return h.hexdigest()


def _source_digest(ckpt: Checkpoint) -> str:
    entries = sorted((n, e.shard, e.dtype, e.shape, e.start, e.end) for n, e in ckpt.entries.items())
    sizes = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in ckpt.folder.glob("*.safetensors"))
    return hashlib.sha256(json.dumps([entries, sizes, ckpt.config.digest()], default=str).encode()).hexdigest()


def _layers(ckpt: Checkpoint) -> list[tuple[int, str]]:
    """(layer index, tensor prefix) of every block, MTP included."""
    cfg = ckpt.config
    return ([(i, f"layers.{i}.") for i in range(cfg.num_hidden_layers)]
            + [(cfg.num_hidden_layers + j, f"mtp.{j}.") for j in range(cfg.num_nextn_predict_layers)])


def _example_inputs(ckpt: Checkpoint, layer: int, prefix: str, act: torch.dtype, max_len: int):
    cfg = ckpt.config
    table, keep = decode.expert_table(ckpt.get, cfg, layer, prefix)
    caches = decode.new_caches(cfg, layer, 1, max_len, act)
    h = torch.zeros(1, cfg.hc_mult, cfg.hidden_size, dtype=act)
    return (h, torch.tensor([0]), torch.tensor([0]), table, caches), keep


def _compile_program(ckpt: Checkpoint, layer: int, prefix: str, act: torch.dtype, max_len: int, path: Path) -> dict:
    cfg = ckpt.config
    if prefix.startswith("mtp."):
        program = decode.DecodeMTP(cfg, ckpt.get, int(prefix.split(".")[1]), act, max_len)
    else:
        program = decode.DecodeLayer(cfg, ckpt.get, layer, act, max_len)
    args, keep = _example_inputs(ckpt, layer, prefix, act, max_len)
    exported = torch.export.export(program, args)
    torch._inductor.aoti_compile_and_package(exported, package_path=str(path))
    return {name: [list(t.shape), str(t.dtype).removeprefix("torch."), "-inf" if name.endswith("_score") else "0"]
            for name, t in args[4].items()}


def build(recipe: Recipe, checkpoint: str | Path, out: str | Path,
          progress: Progress | None = None) -> BuildSummary:
    if recipe.backend != "aoti" or recipe.device != "cpu":
        raise UserError(f"backend {recipe.backend!r} on {recipe.device!r} is not implemented yet; "
                        f"this build supports 'aoti' on 'cpu'")
    out = Path(out)
    ckpt = Checkpoint(checkpoint)
    cfg = ckpt.config
    act = getattr(torch, recipe.dtype)
    max_len = recipe.max_context
    summary = BuildSummary(out)
    key_base = {"source": _source_digest(ckpt), "recipe": asdict(recipe), "code": _code_digest(),
                "torch": torch.__version__}
    old_state = json.loads((out / STATE).read_text()) if (out / STATE).is_file() else {}
    new_state: dict[str, str] = {}
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    (partial / "experts").mkdir(parents=True)
    (partial / "programs").mkdir()

    def stage(name: str, rel: str, make: Callable[[Path], object], **key) -> object:
        digest = hashlib.sha256(json.dumps({**key_base, **key, "file": rel}, sort_keys=True, default=str)
                                .encode()).hexdigest()
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

    def previous(name: str) -> dict:
        return json.loads((out / name).read_text()) if (out / name).is_file() else {}

    old_bank, old_layers = previous("bank.json"), previous("layers.json")
    layers = _layers(ckpt)
    timings = summary.stage_seconds
    t0 = time.time()
    bank = {}
    for n, (layer, prefix) in enumerate(layers):
        entry = stage("experts", f"experts/layer-{layer:03d}.experts",
                      lambda p, layer=layer, prefix=prefix: write_layer_bank(ckpt, layer, p, prefix=prefix))
        bank[str(layer)] = entry if entry is not None else old_bank[str(layer)]
        if progress:
            progress("experts", n + 1, len(layers))
    timings["experts"] = time.time() - t0

    t0 = time.time()
    stage("dense", "dense.safetensors", lambda p: save_file({k: ckpt.get(k).contiguous() for k in DENSE}, str(p)))
    timings["dense"] = time.time() - t0

    t0 = time.time()
    layer_table = []
    for n, (layer, prefix) in enumerate(layers):
        rel = f"programs/layer-{layer:03d}.pt2"
        spec = stage("programs", rel, lambda p, layer=layer, prefix=prefix:
                     _compile_program(ckpt, layer, prefix, act, max_len, p))
        layer_table.append({"layer": layer, "prefix": prefix, "program": rel, "experts": bank[str(layer)]["file"],
                            "caches": spec if spec is not None else old_layers[str(layer)]["caches"]})
        if progress:
            progress("programs", n + 1, len(layers))
    timings["programs"] = time.time() - t0

    t0 = time.time()
    (partial / "layers.json").write_text(json.dumps({str(e["layer"]): e for e in layer_table}, indent=2))
    (partial / "bank.json").write_text(json.dumps(bank, indent=2))
    (partial / "config.json").write_text(json.dumps(cfg.to_json(), indent=2))
    if (ckpt.folder / "tokenizer.json").is_file():
        shutil.copyfile(ckpt.folder / "tokenizer.json", partial / "tokenizer.json")
    (partial / STATE).write_text(json.dumps(new_state, indent=2))
    write_manifest(partial, {
        "model_id": recipe.name, "config_digest": cfg.digest(), "recipe": asdict(recipe),
        "backend": recipe.backend, "device": recipe.device, "gpu_archs": list(recipe.gpu_archs),
        "dtype": recipe.dtype, "max_context": max_len, "decode_batch": 1,
        "versions": {"torch": torch.__version__.split("+")[0]}, "layers": layer_table,
    })
    timings["manifest"] = time.time() - t0
    old = out.with_name(out.name + ".old")
    if out.exists():
        out.rename(old)
    partial.rename(out)
    if old.exists():
        shutil.rmtree(old)
    return summary
