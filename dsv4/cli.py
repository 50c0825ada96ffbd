"""`dsv4`: the command line. A thin layer: each command parses flags and calls library code by keyword.

User mistakes (bad paths, bad flags, damaged files) end with one line on stderr and exit code 2.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import click

from runtime.errors import UserError

DTYPES = ("bfloat16", "float32", "float64")
TINY_DIR = Path("artifacts") / "tiny-checkpoint"


def _device(name: str) -> str:
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but this machine has no CUDA GPU")
    return name


def _options(*options):
    """One decorator applying click options in the order listed (the order --help shows them)."""
    def apply(f):
        for option in reversed(options):
            f = option(f)
        return f
    return apply


# How `dsv4 run`, `chat` and `serve` load an artifact (_open_artifact's arguments)
_loading_options = _options(
    click.option("--device", default="auto", show_default=True, help="auto = what the artifact was compiled for."),
    click.option("--eager", is_flag=True, help="Run the layer programs eagerly instead of the compiled ones."),
    click.option("--no-graphs", is_flag=True, help="On a GPU: launch every decode step and prefill chunk from the "
                 "host instead of replaying CUDA graphs (captured at load)."),
    click.option("--expert-slots", type=click.IntRange(0), default=None,
                 help="Routed experts kept in device slots; the rest are paged (default: the recipe's; 0 = all)."),
    click.option("--draft", is_flag=True, help="Speculative decoding: the MTP block drafts a token that each pass "
                 "verifies (greedy, the same tokens; sampling, the same distribution; its experts on the device). "
                 "Off by default: on the H200 a 2-token pass still costs about two steps (README)."))
# How `dsv4 run` and `chat` pick each token
_sampling_options = _options(
    click.option("--temperature", type=click.FloatRange(0), default=0.0, show_default=True, help="0 = greedy."),
    click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True),
    click.option("--seed", type=int, default=0, show_default=True))


@contextlib.contextmanager
def _progress_bar():
    """A transient bar on stderr for each stage of a long step (synth, build, load, verify); yields the
    `progress(stage, done, total)` callback they report through (runtime.manifest.Progress)."""
    from rich.console import Console
    from rich.progress import Progress
    with Progress(console=Console(stderr=True), transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)
        yield progress


def _load_reference(checkpoint: Path | None, device: str, dtype: str, max_len: int):
    """Open a checkpoint (the embedded tiny model when none is given) and build the reference model."""
    import torch

    from builder.checkpoint import Checkpoint
    from builder.reference.model import ReferenceModel
    ckpt = Checkpoint(checkpoint or ensure_tiny())
    return ckpt, ReferenceModel(ckpt, device=_device(device), act=getattr(torch, dtype), max_len=max_len)


def _open_artifact(artifact: Path, device: str = "auto", eager: bool = False, graphs: bool = True,
                   expert_slots: int | None = None, prefetch: str = "predict", draft: bool = False):
    """Load a built artifact on `device` ("auto": where its programs were compiled for). `eager` runs the
    layer programs as modules instead of the compiled ones (an eager artifact always does); CUDA graphs
    are captured on a GPU unless `graphs` is off; `prefetch`: what the expert pager fetches ahead of use
    (runtime.artifact.PREFETCH); `draft`: load the MTP block as drafter where the artifact has its programs."""
    import torch

    from runtime.artifact import ArtifactModel
    from runtime.errors import read_json
    manifest = read_json(artifact / "manifest.json", UserError,
                         f"no artifact at {artifact}; build one first, e.g. `dsv4 build recipes/tiny.toml`")
    if device == "auto":
        device = manifest.get("device", "cpu") if manifest.get("backend") == "aoti" else _device("auto")
    programs = prefill = None
    if eager or manifest.get("backend") == "eager":
        from builder.config import parse_config
        from builder.programs.decode import make_program
        from builder.programs.prefill import make_prefill_program
        cfg = parse_config(json.loads((artifact / "config.json").read_text()))
        act, max_len = getattr(torch, manifest["dtype"]), manifest["max_context"]
        chunk = manifest["recipe"]["prefill_chunk"]
        programs = lambda layer: make_program(cfg, layer, act, max_len)  # noqa: E731
        prefill = lambda layer: make_prefill_program(cfg, layer, act, max_len, chunk)  # noqa: E731
    with _progress_bar() as progress:
        return ArtifactModel(artifact, _device(device), programs=programs,
                             graphs=graphs and device.startswith("cuda"), expert_slots=expert_slots, prefill=prefill,
                             prefetch=prefetch, progress=progress, draft=draft)


def ensure_tiny() -> Path:
    """The embedded tiny model: synthesised once (seed 0) into artifacts/tiny-checkpoint."""
    from builder.checkpoint import INDEX_FILE
    if not (TINY_DIR / INDEX_FILE).is_file():
        from builder.presets import preset_json
        from builder.synth import write_synthetic
        click.echo(f"creating the embedded tiny model in {TINY_DIR} ...", err=True)
        write_synthetic(preset_json("tiny"), TINY_DIR, seed=0)
    return TINY_DIR


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """dsv4-aot: compile and run DeepSeek V4 (official MXFP4/FP8 checkpoints) on one GPU box.

    Without a checkpoint, commands use the embedded tiny model (synthesised on first use).
    """


@cli.command()
@click.option("--model", "model", type=click.Choice(["tiny", "flash", "pro"]), default="tiny", show_default=True,
              help="Named config: the tiny test model or DeepSeek V4 Flash / Pro sizes.")
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="A config.json to use instead of a named model.")
@click.option("--layers", type=int, help="Keep only the first N transformer layers (plus MTP).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output checkpoint folder.")
@click.option("--device", default="cpu", show_default=True,
              help="Where the random weights are drawn (cuda is far faster at Flash size; a seed's weights "
                   "differ between cpu and cuda).")
@click.option("--routing-skew", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Make some routed experts hot in every layer: each expert's choice is biased by "
                   "-SKEW * ln(1 + its rank) in a random ranking (Flash: 0.1 sends about 60% of routes to a "
                   "quarter of the experts). 0: random weights route near uniformly.")
def synth(model: str, config_file: Path | None, layers: int | None, seed: int, out: Path, device: str,
          routing_skew: float) -> None:
    """Write a synthetic checkpoint in the official layout (shards, index, config.json, tokenizer.json).

    Weights are random but realistically scaled; FP8 and MXFP4 tensors are packed exactly as DeepSeek's.
    """
    from builder.config import ConfigError, parse_config
    from builder.presets import preset_json
    from builder.synth import write_synthetic
    if config_file:
        try:
            raw = json.loads(config_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read config {config_file}: {e}") from None
        if layers is not None:
            raise ConfigError("--layers applies to named models only")
        parse_config(raw)
    else:
        raw = preset_json(model, layers)
    import torch
    try:
        torch.empty(0, device=device)
    except (RuntimeError, ValueError, AssertionError) as e:     # AssertionError: a torch built without CUDA
        raise UserError(f"--device {device}: {str(e).splitlines()[0]}") from None
    t0 = time.time()
    with _progress_bar() as progress:
        write_synthetic(raw, out, seed=seed, device=device, routing_skew=routing_skew, progress=progress)
    click.echo(f"wrote {out} in {time.time() - t0:.1f}s")


@cli.command("inspect")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="Checkpoint folder (validates every shard).")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="A config.json.")
@click.option("--model", type=click.Choice(["tiny", "flash", "pro"]), help="A named config.")
@click.option("--budget-gib", type=float, help="Memory budget to check the whole model against.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def inspect_cmd(checkpoint: Path | None, config_file: Path | None, model: str | None, budget_gib: float | None,
                as_json: bool) -> None:
    """Parameters (total, active per token, by dtype), bytes read per decoded token, memory fit."""
    from builder.checkpoint import Checkpoint
    from builder.config import load_config
    from builder.presets import preset
    from builder.sizes import GIB, model_sizes
    if sum(x is not None for x in (checkpoint, config_file, model)) != 1:
        raise UserError("give exactly one of --checkpoint, --config or --model")
    cfg = (Checkpoint(checkpoint).config if checkpoint else load_config(config_file) if config_file
           else preset(model))
    s = model_sizes(cfg)
    report = {
        "params_total": s.params_total, "params_mtp": s.params_mtp, "params_active_per_token": s.params_active,
        "params_by_dtype": s.params_by_dtype, "checkpoint_bytes": s.checkpoint_bytes,
        "bytes_read_per_token": s.bytes_per_token, "routed_expert_bytes": s.expert_bytes,
    }
    if budget_gib is not None:
        report["budget_gib"] = budget_gib
        report["fits_budget"] = s.checkpoint_bytes <= budget_gib * GIB
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    b = lambda n: f"{n / 1e9:.2f} GB ({n / GIB:.2f} GiB)"  # noqa: E731
    click.echo(f"parameters (main model, no MTP): {s.params_total / 1e9:.2f}B   MTP: {s.params_mtp / 1e9:.2f}B")
    click.echo(f"active per token (excl. input embedding): {s.params_active / 1e9:.2f}B")
    for dtype, n in sorted(s.params_by_dtype.items(), key=lambda kv: -kv[1]):
        click.echo(f"  {dtype:8s} {n / 1e9:9.3f}B")
    click.echo(f"checkpoint size: {b(s.checkpoint_bytes)}   one routed expert: {s.expert_bytes / 1e6:.1f} MB")
    click.echo(f"bytes read per decoded token: {b(s.bytes_per_token)}")
    if budget_gib is not None:
        verdict = "fits" if report["fits_budget"] else "does NOT fit"
        click.echo(f"whole model {verdict} a budget of {budget_gib:g} GiB (needs {s.checkpoint_bytes / GIB:.1f} GiB)")


def _read_ids(inline: str | None, file: Path | None, what: str, required: bool) -> list[int]:
    from builder.forced import parse_ids
    if inline is not None and file is not None:
        raise UserError(f"give --{what} or --{what}-file, not both")
    if file is not None:
        if not file.is_file():
            raise UserError(f"--{what}-file: no file at {file}")
        return parse_ids(file.read_text(), f"--{what}-file")
    if inline is None:
        if required:
            raise UserError(f"--{what} or --{what}-file is required")
        return []
    return parse_ids(inline, f"--{what}")


@cli.command()
@click.option("--checkpoint", type=click.Path(path_type=Path), help="Checkpoint folder (default: embedded tiny model).")
@click.option("--artifact", type=click.Path(path_type=Path), help="Run a built artifact instead of the reference.")
@click.option("--prompt-ids", help="Prompt token ids, comma or space separated.")
@click.option("--prompt-ids-file", type=click.Path(path_type=Path), help="File holding the prompt token ids.")
@click.option("--forced-ids", help="Token ids fed one decode step each.")
@click.option("--forced-ids-file", type=click.Path(path_type=Path), help="File holding the forced token ids.")
@click.option("--out", type=click.Path(path_type=Path), help="Write logits [1 + n_forced, vocab] here (safetensors).")
@click.option("--compare", "compare_with", type=click.Path(path_type=Path),
              help="Compare with another logits file and print per-step agreement.")
@click.option("--min-cosine", type=float, default=0.999, show_default=True,
              help="With --compare: exit non-zero if any step's cosine is below this.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--dtype", type=click.Choice(DTYPES), default="bfloat16", show_default=True,
              help="Activation dtype; bfloat16 reproduces DeepSeek's official numerics.")
@click.option("--pairs", is_flag=True,
              help="With --artifact: feed the forced tokens two at a time through the verification of drafted "
                   "tokens (speculative decoding's pass) instead of one decode step each; the same rows.")
def forced(checkpoint, artifact, prompt_ids, prompt_ids_file, forced_ids, forced_ids_file, out, compare_with,
           min_cosine, device, dtype, pairs) -> None:
    """Logits after prefilling a prompt, then after each forced token as one decode step.

    Row 0 of the output is after the whole prompt; row i after feeding forced_ids[i-1].
    """
    from builder.forced import check_ids, compare, forced_logits, load_logits, save_logits
    prompt = _read_ids(prompt_ids, prompt_ids_file, "prompt-ids", required=True)
    steps = _read_ids(forced_ids, forced_ids_file, "forced-ids", required=False)
    if not prompt:
        raise UserError("the prompt needs at least one token id")
    if out is None and compare_with is None:
        raise UserError("give --out, --compare or both")
    other = load_logits(compare_with) if compare_with else None
    if pairs and artifact is None:
        raise UserError("--pairs feeds an artifact's verification of drafts: give --artifact")
    if artifact is not None:
        if checkpoint is not None:
            raise UserError("give --checkpoint or --artifact, not both")
        model = _open_artifact(artifact, device, draft=pairs)     # draft: the verification as speculative runs it
        if pairs and model.verify_runs is None:
            raise UserError(f"{artifact} has no programs that verify drafts (they come with an aoti build whose "
                            f"recipe has runtime.draft_tokens = 1)")
        vocab, source = model.config.vocab_size, f"artifact:{artifact}" + (" (pairs)" if pairs else "")
    else:
        ckpt, model = _load_reference(checkpoint, device, dtype, max_len=len(prompt) + len(steps) + 1)
        vocab, source = ckpt.config.vocab_size, f"reference:{ckpt.folder}"
    check_ids(prompt + steps, vocab, "token ids")
    t0 = time.time()
    logits = forced_logits(model, prompt, steps, paired=pairs)
    click.echo(f"{len(prompt)} prompt tokens + {len(steps)} forced steps in {time.time() - t0:.2f}s", err=True)
    if out:
        save_logits(out, logits, prompt, steps, source=source)
        click.echo(f"wrote {out}", err=True)
    if other is not None:
        stats = compare(logits, other)
        worst = min(s.cosine for s in stats)
        agree = sum(s.argmax_a == s.argmax_b for s in stats)
        for s in stats:
            mark = "" if s.argmax_a == s.argmax_b and s.cosine >= min_cosine else "   <--"
            click.echo(f"step {s.step:3d}  argmax {s.argmax_a:6d} vs {s.argmax_b:6d}  cosine {s.cosine:.6f}  "
                       f"max|diff| {s.max_abs:.4g}{mark}")
        click.echo(f"argmax agreement {agree}/{len(stats)}, worst cosine {worst:.6f}")
        if worst < min_cosine:
            click.echo(f"error: cosine {worst:.6f} is below --min-cosine {min_cosine}", err=True)
            sys.exit(1)


@cli.command()
@click.option("--checkpoint", type=click.Path(path_type=Path), help="Checkpoint folder (default: embedded tiny model).")
@click.option("--prompt", required=True, help="Prompt text.")
@click.option("--chat", is_flag=True, help="Render the prompt as a chat turn.")
@click.option("--thinking", is_flag=True, help="With --chat: thinking mode (opens the answer with <think>).")
@click.option("--system", default="", help="With --chat: system message.")
@click.option("--max-new", type=click.IntRange(1, 100000), default=32, show_default=True)
@click.option("--device", default="auto", show_default=True)
def generate(checkpoint, prompt, chat, thinking, system, max_new, device) -> None:
    """Greedy generation with the reference model (slow; the ground truth, not the fast path)."""

    from runtime.generate import generate as run_generation
    from runtime.generate import prompt_ids
    from runtime.tokenizer import Tokenizer
    folder = checkpoint or ensure_tiny()
    tok = Tokenizer(folder)
    ids = prompt_ids(tok, prompt, chat, thinking, system)
    _, model = _load_reference(folder, device, "bfloat16", max_len=len(ids) + max_new)
    timing = run_generation(model, tok, ids, max_new, lambda text: click.echo(text, nl=False))
    click.echo()
    click.echo(timing.line("reference model"), err=True)


@cli.command("build")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--checkpoint", type=click.Path(path_type=Path), help="Checkpoint folder (default: the recipe's source).")
@click.option("--out", type=click.Path(path_type=Path), help="Artifact folder (default: artifacts/<recipe name>).")
def build_cmd(recipe: Path, checkpoint: Path | None, out: Path | None) -> None:
    """Compile a checkpoint into an artifact as RECIPE says (recipes/*.toml).

    Resumable: outputs whose inputs did not change are reused. The new artifact replaces the old one only
    when complete.
    """
    from builder.build import build
    from builder.recipe import load_recipe
    r = load_recipe(recipe)
    source = checkpoint or (ensure_tiny() if r.source == "tiny" else Path(r.source))
    out = out or Path("artifacts") / r.name
    t0 = time.time()
    with _progress_bar() as progress:
        summary = build(r, source, out, progress)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    click.echo(f"built {out} in {time.time() - t0:.1f}s: {len(summary.made)} outputs made, "
               f"{len(summary.reused)} reused, {size / 1e6:.1f} MB")
    for stage, seconds in summary.stage_seconds.items():
        click.echo(f"  {stage:9s} {seconds:7.1f}s")


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="Prompt text.")
@click.option("--chat", is_flag=True, help="Render the prompt as a chat turn.")
@click.option("--thinking", is_flag=True, help="With --chat: thinking mode (opens the answer with <think>).")
@click.option("--system", default="", help="With --chat: system message.")
@click.option("--max-new", type=click.IntRange(1, 100000), default=64, show_default=True)
@_sampling_options
@_loading_options
def run(artifact, prompt, chat, thinking, system, max_new, temperature, top_p, seed, device, eager,
        no_graphs, expert_slots, draft) -> None:
    """Generate from a built artifact, streaming text; stops at end of sentence, then reports speeds."""
    from runtime.generate import generate as run_generation
    from runtime.generate import prompt_ids
    from runtime.sampling import Sampling
    from runtime.tokenizer import Tokenizer
    model = _open_artifact(artifact, device, eager, graphs=not no_graphs, expert_slots=expert_slots,
                           draft=draft)
    tok = Tokenizer(artifact)
    ids = prompt_ids(tok, prompt, chat, thinking, system)
    if len(ids) + max_new > model.max_len:
        raise UserError(f"prompt ({len(ids)} tokens) + --max-new {max_new} exceeds the artifact's context "
                        f"of {model.max_len}")
    timing = run_generation(model, tok, ids, max_new, lambda text: click.echo(text, nl=False),
                            Sampling(temperature, top_p, seed))
    click.echo()
    mode = f"{model.backend} on {model.device}" + (", CUDA graph" if model.graph is not None else "")
    click.echo(timing.line(f"{mode}"), err=True)
    if model.pager is not None:
        click.echo(_pager_line(model.pager), err=True)


def _pager_line(pager) -> str:
    s = pager.stats
    predicted = (f", predictions right on {s.predicted_used}/{s.predicted} experts used" if s.predicted else "")
    return (f"expert pager: {pager.pool.slots} slots, hit rate {s.hit_rate:.3f} ({s.hits} hits, {s.misses} "
            f"misses, {s.prefetch_hits} prefetch hits){predicted}, {pager.bytes_moved / 1e6:.1f} MB copied in, "
            f"{pager.cold_bytes_read / 1e6:.1f} MB read from cold copies, "
            f"{pager.stall_s * 1e3:.1f} ms waiting for copies of {pager.waited_bytes / 1e6:.1f} MB "
            f"({pager.waited_again} of them experts a prediction had evicted)")


@cli.command("chat")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--system", default="", help="System message.")
@click.option("--thinking", is_flag=True, help="Thinking mode: each answer opens with <think>.")
@click.option("--max-new", type=click.IntRange(1), default=1024, show_default=True, help="Most tokens an answer takes.")
@_sampling_options
@_loading_options
def chat_cmd(artifact, system, thinking, max_new, temperature, top_p, seed, device, eager, no_graphs,
             expert_slots, draft) -> None:
    """Chat with an artifact in the terminal. Each answer streams as it is generated; the conversation stays in
    the model's caches, so a turn prefills only itself (thinking mode excepted: the template drops earlier
    reasoning). /reset starts a new conversation, /bye or Ctrl-D ends, Ctrl-C stops an answer."""
    from runtime.chat import Message, render
    from runtime.generate import Conversation
    from runtime.sampling import Sampling
    from runtime.tokenizer import END_THINK, Tokenizer
    try:
        __import__("readline")        # line editing and history for input(), where the platform has it
    except ImportError:
        pass
    model = _open_artifact(artifact, device, eager, graphs=not no_graphs, expert_slots=expert_slots,
                           draft=draft)
    conversation = Conversation(model, Tokenizer(artifact))
    opening = [Message("system", system)] if system else []
    messages = list(opening)
    while True:
        try:
            line = input(">>> ").strip()
        except EOFError:
            break
        if line in ("/bye", "/exit"):
            break
        if line == "/reset":
            messages = list(opening)
            continue
        if not line:
            continue
        messages.append(Message("user", line))
        shown: list[str] = []

        def emit(piece: str) -> None:
            shown.append(piece)
            click.echo(piece, nl=False)
        try:
            turn = conversation.generate(render(messages, thinking=thinking), max_new, emit,
                                         Sampling(temperature, top_p, seed + len(messages)))
            status = turn.generation.line(f"{turn.cached} prompt tokens cached")
        except KeyboardInterrupt:     # what the caches hold is not known: the next turn is prefilled afresh
            conversation.forget()
            status = "stopped"
        click.echo()
        click.echo(status, err=True)
        reasoning, _, content = "".join(shown).rpartition(END_THINK) if thinking else ("", "", "".join(shown))
        messages.append(Message("assistant", content, reasoning))


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--name", help="The model name clients see and send (default: the artifact's model id).")
@click.option("--api-key", help="Answer only requests that carry this key (Authorization: Bearer KEY); set it "
              "when listening beyond this machine.")
@click.option("--keep-conversations", type=click.IntRange(0), default=2, show_default=True,
              help="Other conversations whose caches are kept in host memory, so that their next turn is not "
                   "prefilled afresh (a chat UI's title request between two turns); each holds a copy of the "
                   "caches (about 0.47 GB for Flash at 64K context).")
@_loading_options
def serve(artifact, host, port, name, api_key, keep_conversations, device, eager, no_graphs, expert_slots,
          draft) -> None:
    """Serve an artifact over HTTP with OpenAI's API: POST /v1/chat/completions and /v1/completions (whole
    or streamed), GET /v1/models. One request runs at a time; the others wait their turn. A chat's next turn
    is prefilled from where the last one ended when its prompt extends it. Thinking mode:
    `chat_template_kwargs: {"thinking": true}`; its thinking comes back as `reasoning_content`. Needs the
    serve extra: pip install -e '.[serve]'."""
    try:
        import uvicorn

        from runtime.server import Engine, make_app
    except ImportError as e:
        raise UserError(f"dsv4 serve needs {e.name}: pip install -e '.[serve]'") from None
    from runtime.tokenizer import Tokenizer
    model = _open_artifact(artifact, device, eager, graphs=not no_graphs, expert_slots=expert_slots,
                           draft=draft)
    name = name or model.manifest.get("model_id", artifact.name)
    engine = Engine(model, Tokenizer(artifact), log=lambda line: click.echo(line, err=True), keep=keep_conversations)
    click.echo(f"serving {artifact} as {name!r} on http://{host}:{port}/v1 ({model.backend} on {model.device}, "
               f"context {model.max_len} tokens)", err=True)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        click.echo(f"warning: listening on {host} without --api-key: anyone who reaches this port can use it",
                   err=True)
    uvicorn.run(make_app(engine, name, api_key), host=host, port=port, log_level="warning")


@cli.command("bench")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--compare", "compare_with", type=click.Choice(["eager", "none"]), default="eager", show_default=True,
              help="Also run the layer programs eagerly, in the same process.")
@click.option("--prompt-len", type=click.IntRange(1), default=32, show_default=True,
              help="Prompt tokens (a fixed synthetic sequence), prefilled in chunks by the artifact's prefill "
                   "programs (one decode step each where it has none).")
@click.option("--new", "new_tokens", type=click.IntRange(2), default=32, show_default=True,
              help="Tokens generated greedily after the prompt.")
@click.option("--device", default="auto", show_default=True, help="auto = what the artifact was compiled for.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Also write the figures here.")
@click.option("--expert-slots", type=click.IntRange(0), default=None,
              help="Routed experts kept in device slots; the rest are paged (default: the recipe's; 0 = all).")
def bench_cmd(artifact, compare_with, prompt_len, new_tokens, device, json_out, expert_slots) -> None:
    """Time to first token, prefill and decode tok/s of an artifact (with and without CUDA graphs on a GPU),
    side by side with eager; greedy tokens of every mode must agree. On a GPU, decode is also given as a
    fraction of (bytes read per token / device copy bandwidth measured in this run). When experts are
    paged (--expert-slots), the compiled run is repeated without route prediction (hash-routed layers'
    experts still fetched from the token ids), without any prefetch, admitting every miss (the admission
    rule before the frequency rule), and with every expert resident where
    the device has the memory: hit rates, how often the predictions were right, bytes copied in and read
    from cold copies, the time steps waited for copies (those into their first layers), and the decode time
    lost to paging (those waits and the misses' reads from host memory) against the resident run."""
    import gc
    import platform

    import torch

    from runtime.bench import bytes_per_token, copy_bandwidth, measure, routed_expert_bytes, synthetic_prompt
    prompt = synthetic_prompt(prompt_len)
    # (name, eager, graphs, pager prefetch, expert slots); the list grows once the device is known
    modes = [("compiled", False, True, "predict", expert_slots)]
    modes += [("eager", True, False, "predict", expert_slots)] if compare_with == "eager" else []
    report: dict = {"command": " ".join(sys.argv), "artifact": str(artifact), "torch": torch.__version__,
                    "python": platform.python_version(), "modes": {}}
    per_token = bandwidth = None
    for name, eager, graphs, prefetch, slots in modes:
        model = _open_artifact(artifact, device, eager, graphs, slots, prefetch, draft=True)
        if model.pager is not None:
            if name == "compiled":
                modes[1:1] = [("compiled-no-prediction", False, True, "hash", slots),
                              ("compiled-no-prefetch", False, True, "none", slots),
                              ("compiled-admit-always", False, True, "predict", slots)]
                # the same run with every expert resident, if the device holds them (not on a GB10)
                if (model.device.type != "cuda" or torch.cuda.mem_get_info(model.device)[0]
                        + model.pager.device_bytes() > 1.05 * routed_expert_bytes(model)):
                    modes.append(("compiled-resident", False, True, "predict", 0))
        if name == "compiled" and model.device.type == "cuda":
            modes.insert(1, ("compiled-no-graph", False, False, "predict", slots))
            report["gpu"] = torch.cuda.get_device_name(model.device)
            bandwidth, per_token = copy_bandwidth(model.device), bytes_per_token(model)
            report |= {"copy_bandwidth_gb_s": bandwidth / 1e9, "bytes_per_token": per_token}
        if name == "compiled-admit-always":           # the admission rule up to session 11, for comparison
            model.pager.pool.admit_rule = "always"
        figures = measure(model, prompt, new_tokens)
        if model.pager is not None:
            figures["pager"] = model.pager.report()
            click.echo(_pager_line(model.pager))
        if per_token:
            figures["fraction_of_copy_bandwidth"] = per_token / bandwidth / (figures["decode_step_ms"] / 1e3)
        report["modes"][name] = figures
        click.echo(f"{name:18s} ttft {figures['time_to_first_token_s'] * 1e3:8.1f} ms "
                   f"(cold {figures['cold_time_to_first_token_s'] * 1e3:.1f})  prefill "
                   f"{figures['prefill_tok_s']:8.1f} tok/s  decode {figures['decode_tok_s']:8.1f} tok/s"
                   + (f"  ({figures['fraction_of_copy_bandwidth']:.2f} of copy bandwidth)" if per_token else ""))
        if "speculative" in figures:
            spec = figures["speculative"]
            click.echo(f"{name + ' drafts':18s} decode {spec['decode_tok_s']:8.1f} tok/s, {spec['accepted']} of "
                       f"{spec['drafted']} drafts accepted, tokens "
                       + ("as without drafts" if spec["tokens_match_plain"] else "DIFFER from those without drafts")
                       + f"; a pass whose draft is accepted {spec['accepted_pass_ms']:.2f} ms (every draft accepted: "
                       f"{spec['decode_tok_s_all_accepted']:.1f} tok/s; the host's pass, sampling's, "
                       f"{spec['host_pass_ms']:.2f} ms); "
                       + (f"drafts pay above {spec['pays_above_acceptance']:.0%} accepted"
                          if spec["pays_above_acceptance"] < 1 else "drafts cannot pay: a pass costs two steps or more"))
        # Gone before the next mode's opens, even where something still refers back to it (a collection
        # frees cycles): at Flash-8 two models fit an 80 GB GPU, three do not.
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    runs = report["modes"]
    base = runs["compiled"]
    if "compiled-resident" in runs:              # what paging cost each paged mode, decode steps only
        for name, figures in runs.items():
            if "pager" in figures:
                step_ms = figures["decode_step_ms"] - runs["compiled-resident"]["decode_step_ms"]
                lost = step_ms * figures["decode_tokens"] / 1e3
                figures["pager"]["time_lost_to_paging_s"] = lost
                click.echo(f"{name:18s} decode time lost to paging against the resident run: {lost * 1e3:.1f} ms")
    for name, figures in runs.items():
        if name != "compiled":
            report[f"decode_speedup_compiled_vs_{name}"] = base["decode_tok_s"] / figures["decode_tok_s"]
    # Greedy tokens of each mode against the compiled run's: the length of the common prefix. Compiled modes
    # run the same kernels, so they must agree fully; eager in bfloat16 rounds differently from Inductor's
    # fused kernels, and on random weights a near-tie argmax then sends greedy decoding elsewhere.
    report["tokens_agree"] = all(r["tokens"] == base["tokens"] for r in runs.values())
    report["common_prefix_with_compiled"] = {
        name: next((i for i, (a, b) in enumerate(zip(r["tokens"], base["tokens"])) if a != b), len(base["tokens"]))
        for name, r in runs.items() if name != "compiled"}
    click.echo("greedy tokens, common prefix with compiled: " + ", ".join(
        f"{name} {n}/{len(base['tokens'])}" for name, n in report["common_prefix_with_compiled"].items()))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2))
        click.echo(f"wrote {json_out}", err=True)


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--no-hashes", is_flag=True, help="Check sizes only (skip hashing large files).")
def verify(artifact: Path, no_hashes: bool) -> None:
    """Check a built (or copied) artifact without running it: every file's size and sha256 (all hashed
    afresh; loading an artifact hashes only the files changed since they last hashed clean here), and
    whether this machine's GPU, torch and TensorRT can run it. Lists every problem; exit code 1 if any."""
    from runtime.manifest import Machine, check_artifact
    machine = Machine.this()
    with _progress_bar() as progress:
        manifest, problems = check_artifact(artifact, machine, hashes=not no_hashes, trust_verified=False,
                                            progress=progress)
    click.echo(f"artifact {artifact}: model {manifest.get('model_id', '?')}, backend {manifest.get('backend', '?')}, "
               f"{len(manifest.get('files', []))} files")
    click.echo(f"this machine: GPU {machine.gpu_arch or 'none'}, "
               + ", ".join(f"{k} {v}" for k, v in sorted(machine.versions.items())))
    for p in problems:
        click.echo(f"problem: {p}")
    if problems:
        click.echo(f"error: {len(problems)} problem(s); this artifact cannot run here as it is", err=True)
        sys.exit(1)
    click.echo("ok: every file matches the manifest and this machine can run it")


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
