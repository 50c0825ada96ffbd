"""`dsv4 build` on the tiny recipe: an aoti artifact that matches the reference, rebuilt in a fraction of
the time, refused when damaged."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from builder.build import build
from builder.checkpoint import Checkpoint
from builder.forced import forced_logits
from builder.recipe import load_recipe
from builder.reference.model import ReferenceModel
from runtime.artifact import ArtifactModel
from runtime.manifest import ArtifactError

from helpers import count_bucket_runs, greedy_both_ways

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny.toml"    # what conftest's `built` builds


@pytest.mark.slow
def test_artifact_matches_the_reference(built, tiny_dir):
    out, _, summary = built
    assert not summary.reused and (out / "manifest.json").is_file()
    # one decode program per layer kind (hash layers 0 and 1 share one), one prefill program per main layer
    # kind and size (the chunk, the bucket) and a verification program per main layer kind (the drafts'), the
    # MTP block's of 2 tokens and its window; weights bound from their own files
    kinds = ["layer-ratio0-hash", "layer-ratio128", "layer-ratio4", "layer-ratio4-hash"]
    window = json.loads((out / "config.json").read_text())["sliding_window"]
    assert sorted(p.name for p in (out / "programs").iterdir()) == sorted(
        [f"{k}-b1.pt2" for k in kinds + ["mtp-ratio0"]] + [f"{k}-prefill-c{c}.pt2" for k in kinds for c in (8, 64)]
        + [f"{k}-verify.pt2" for k in kinds] + [f"mtp-ratio0-prefill-c{c}.pt2" for c in (2, window)])
    assert len(list((out / "weights").iterdir())) == 6
    prompt, forced = [5, 17, 99, 300, 12] * 30, [3, 4, 5, 6, 7, 8]     # 150 tokens: a ratio-128 block completes
    model = ArtifactModel(out)
    assert model.prefill_runs is not None                   # the prompt goes through in 3 chunks of 64
    art = forced_logits(model, prompt, forced)
    model.prefill_runs = None                               # the same artifact, the prompt token by token
    by_token = forced_logits(model, prompt, forced)
    ref = forced_logits(ReferenceModel(Checkpoint(tiny_dir), act=torch.float32, max_len=200), prompt, forced)
    for got in (art, by_token):
        cos = torch.nn.functional.cosine_similarity(got.double(), ref.double(), dim=-1)
        assert torch.equal(got.argmax(-1), ref.argmax(-1)) and cos.min() >= 0.999999, (got - ref).abs().max()
    # `dsv4 forced --pairs`: the forced tokens two at a time through the verification programs, bit for bit the
    # decode steps' rows (float32); from 150 the pairs' second tokens end ratio-4 blocks, from 149 their first
    model = ArtifactModel(out)
    assert model.verify_decode
    for n in (150, 149):
        assert torch.equal(forced_logits(model, prompt[:n], forced, paired=True), forced_logits(model, prompt[:n], forced))


@pytest.mark.slow
def test_short_prompt_goes_through_the_smallest_prefill_program_that_holds_it(built, tiny_dir):
    """The recipe's prefill_buckets (8): a 5-token prompt, and a 70-token one's last 6 tokens, through the
    8-token programs rather than padded to 64: the logits of the reference, as when padded."""
    model = ArtifactModel(built[0])
    assert list(model.prefill_buckets) == [8]                # the drafts' verification has programs of its own
    ran = count_bucket_runs(model, 8)
    ref_model = ReferenceModel(Checkpoint(tiny_dir), act=torch.float32, max_len=200)
    forced = [3, 4, 5]
    for prompt in ([5, 17, 99, 300, 12], [5, 17, 99, 300, 12, 7, 8] * 10):
        ran.clear()
        small = forced_logits(model, prompt, forced)
        assert len(ran) == len(model.layers)                 # one chunk through the small programs
        model.use_buckets = False
        padded = forced_logits(model, prompt, forced)
        model.use_buckets = True
        ref = forced_logits(ref_model, prompt, forced)
        for got in (small, padded):
            cos = torch.nn.functional.cosine_similarity(got.double(), ref.double(), dim=-1)
            assert torch.equal(got.argmax(-1), ref.argmax(-1)) and cos.min() >= 0.999999, (got - ref).abs().max()


@pytest.mark.slow
def test_greedy_decode_with_tokens_fed_on_the_device_equals_step_by_step(built):
    """decode_greedy feeds each picked token to the next step on the device (the host reads it a step
    behind): the same tokens as stepping with each argmax read back; stopping early leaves nothing behind
    that a new request sees."""
    expect, early, greedy = greedy_both_ways(ArtifactModel(built[0]), [5, 17, 99, 300, 12] * 3, 12)
    assert len(set(expect)) > 3 and early == expect[1:5] and greedy == expect


@pytest.mark.slow
def test_rebuild_reuses_everything(built, tiny_dir):
    out, first, _ = built
    t0 = time.time()
    summary = build(load_recipe(RECIPE), tiny_dir, out)
    assert not summary.made and time.time() - t0 < 0.1 * first


@pytest.mark.slow
def test_new_program_code_keeps_the_expert_bank(built, tiny_dir, tmp_path, monkeypatch):
    """New program code (its digest changed) remakes the weights and programs, but links every layer's expert
    bank from the previous artifact: the bank is keyed by the checkpoint and its own code. The compiles are
    stubbed (their outputs are not what is checked), so this runs on a copy of the artifact."""
    import builder.build as stages
    out, _, _ = built
    copy = tmp_path / "tiny"
    subprocess.run(["cp", "-r", str(out), str(copy)], check=True)
    monkeypatch.setattr(stages, "_code_digest", lambda: "new program code")
    monkeypatch.setattr(stages, "_compile_all", lambda jobs, progress: [Path(job[6]).write_bytes(b"stub") for job in jobs])
    summary = build(load_recipe(RECIPE), tiny_dir, copy)
    banks = sorted(f"experts/{p.name}" for p in (out / "experts").iterdir())
    assert len(banks) > 1 and sorted(summary.reused) == banks
    assert any(m.startswith("programs/") for m in summary.made) and any(m.startswith("weights/") for m in summary.made)


@pytest.mark.slow
def test_damaged_artifact_is_refused(built, tmp_path):
    out, _, _ = built
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(out), str(copy)], check=True)
    program = copy / "programs" / "layer-ratio4-hash-b1.pt2"
    data = bytearray(program.read_bytes())
    data[len(data) // 2] ^= 0xFF
    program.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="programs/layer-ratio4-hash-b1.pt2 is corrupted"):
        ArtifactModel(copy)
    r = subprocess.run([sys.executable, "-m", "dsv4.cli", "forced", "--artifact", str(copy), "--prompt-ids", "1,2",
                        "--out", str(tmp_path / "x.safetensors")], capture_output=True, text=True)
    assert r.returncode == 2 and "corrupted" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_load_reports_its_stages_to_the_end(built, tmp_path):
    """A copied artifact (new inodes: hashed in full) loads with its progress reported stage by stage."""
    out, _, _ = built
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(out), str(copy)], check=True)
    seen: dict[str, list] = {}
    model = ArtifactModel(copy, progress=lambda stage, done, total: seen.setdefault(stage, []).append((done, total)))
    assert list(seen) == ["verifying", "loading layers"]
    files = sum(p.stat().st_size for p in copy.rglob("*") if p.is_file() and not p.name.startswith(("manifest",
                                                                                                        ".verified")))
    assert seen["verifying"][-1] == (files, files)
    assert seen["loading layers"][-1] == (len(model.layers), len(model.layers)) and len(model.layers) > 1


@pytest.mark.slow
def test_run_streams_text_from_the_artifact(built, tmp_path):
    out, _, _ = built
    cli = [sys.executable, "-m", "dsv4.cli", "run"]
    r = subprocess.run([*cli, str(out), "--prompt", "Hello", "--chat", "--max-new", "5", "--temperature", "0.8",
                        "--top-p", "0.9", "--seed", "3"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "decode" in r.stderr and "(aoti on cpu)" in r.stderr
    again = subprocess.run([*cli, str(out), "--prompt", "Hello", "--chat", "--max-new", "5", "--temperature", "0.8",
                            "--top-p", "0.9", "--seed", "3"], capture_output=True, text=True)
    assert again.stdout == r.stdout                           # seeded sampling is reproducible
    missing = subprocess.run([*cli, str(tmp_path / "none"), "--prompt", "x"], capture_output=True, text=True)
    assert missing.returncode == 2 and "dsv4 build recipes/tiny.toml" in missing.stderr


@pytest.mark.slow
def test_forced_pairs_gate_the_verification_against_the_reference(built, tiny_dir, tmp_path):
    """`dsv4 forced --artifact A --pairs --compare REF`: the verification of drafts against the reference model's
    logits, the gate speculative decoding's path takes (the tiny artifact is float32)."""
    cli = [sys.executable, "-m", "dsv4.cli", "forced", "--prompt-ids", ",".join(["5,17,99,300,12"] * 6),
           "--forced-ids", "3,4,5,6,7", "--device", "cpu"]
    ref = tmp_path / "ref.safetensors"
    r = subprocess.run([*cli, "--checkpoint", str(tiny_dir), "--dtype", "float32", "--out", str(ref)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*cli, "--artifact", str(built[0]), "--pairs", "--compare", str(ref), "--min-cosine",
                        "0.999999"], capture_output=True, text=True)
    assert r.returncode == 0 and "argmax agreement 6/6" in r.stdout, r.stdout + r.stderr


def test_drafts_pay_above_the_acceptance_where_a_pass_beats_plain_steps():
    from runtime.bench import pays_above
    a = pays_above(2.0, 1.25)                  # a pass of 1.6 steps gives 1 + a tokens
    assert a == pytest.approx(0.6) and (1 + a) * 1.25 == pytest.approx(2.0)     # break-even there
    assert pays_above(2.5, 1.25) == pytest.approx(1.0)                          # two steps a pass: never


def test_top_p_keeps_the_smallest_prefix():
    from runtime.sampling import Sampling, sample
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    picks = {sample(logits, Sampling(1.0, 0.7), g) for _ in range(200)}
    assert picks == {0, 1}
    assert sample(logits, Sampling(), None) == 0


def test_penalties_lower_the_logits_of_generated_tokens():
    """OpenAI's: logit - frequency x count - presence x (count > 0), over the tokens generated so far."""
    from runtime.sampling import Sampling, sample
    logits = torch.tensor([3.0, 2.5, 1.0, 0.0])

    def counts(*tokens):                                                            # sample's running counts
        return torch.bincount(torch.tensor(tokens), minlength=4).float()
    assert sample(logits, Sampling(frequency_penalty=0.3), None, counts(0)) == 0          # 3.0 - 0.3 > 2.5
    assert sample(logits, Sampling(frequency_penalty=0.3), None, counts(0, 0)) == 1       # 3.0 - 0.6 < 2.5
    assert sample(logits, Sampling(presence_penalty=0.6), None, counts(0, 0, 0)) == 1     # once, whatever the count
    assert sample(logits, Sampling(presence_penalty=-1.0), None, counts(2)) == 0 and \
        sample(logits, Sampling(presence_penalty=-2.5), None, counts(2)) == 2             # negative: encouraged


@pytest.mark.slow
def test_pager_under_a_budget_changes_nothing_but_where_experts_are_read(built):
    """20 slots for 80 routed experts: the tables point at slots or at the cold bank; logits are the same."""
    out, _, _ = built
    prompt, forced = [5, 17, 99, 300, 12] * 8, [3, 4, 5, 6, 7, 8]
    resident = forced_logits(ArtifactModel(out), prompt, forced)
    paged_model = ArtifactModel(out, expert_slots=20)
    paged = forced_logits(paged_model, prompt, forced)
    assert torch.equal(paged, resident)
    stats = paged_model.pager.stats
    steps, layers, k = len(forced), 5, 6                    # decode steps (the prompt is prefilled)
    assert stats.hits + stats.misses == steps * layers * k
    assert len(paged_model.pager.pool.resident) <= 20 and paged_model.pager.bytes_moved > 0
    assert stats.prefetch_hits > 0          # hash layers: experts fetched from the next token's id
    # layers 3 and 4 (score-routed) predicted as the layer before them starts: 6 experts each per step
    assert stats.predicted == steps * 2 * k and 0 < stats.predicted_used <= stats.predicted


@pytest.mark.slow
def test_the_pager_counts_waits_for_experts_a_prediction_evicted_and_can_spare_them(built):
    """A step waits for the copies into its first layers; the pager counts those bytes and how many brought
    back an expert a predicted copy had evicted. Sparing the waited layers from those evictions leaves
    none such, and changes no token."""
    from runtime.bench import measure
    runs = {}
    for spare in (False, True):
        model = ArtifactModel(built[0], expert_slots=20)
        model.pager.spare_waited = spare
        tokens = measure(model, [5, 17, 99, 300, 12] * 2, 12)["tokens"]
        runs[spare] = (model.pager.waited_again, model.pager.waited_bytes, tokens)
    assert runs[False][0] > 0 and runs[False][1] > 0     # predictions did evict the first layers' experts
    assert runs[True][0] == 0 and runs[True][2] == runs[False][2]


def test_a_dropped_model_is_freed_in_a_fresh_process(built):
    """A model, its drafter loaded, is freed as soon as it is dropped, without the garbage collector, the first
    one a process loads too: `dsv4 bench` opens one per mode, and at Flash-8 two fit an 80 GB GPU, three do
    not (session 61's run ran out of memory at its third). The drafter and the drafted pass held the model
    (a cycle), and importing torch._inductor inside the first load kept that load's frames, and so the
    model, for the life of the process."""
    code = ("import gc, weakref; gc.disable(); from runtime.artifact import ArtifactModel\n"
            f"refs = [weakref.ref(ArtifactModel({str(built[0])!r}, draft=d)) for d in (False, True, True)]\n"
            "print([r() is None for r in refs])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[True, True, True]"


def test_bench_frees_each_modes_model_before_it_opens_the_next(built, monkeypatch):
    """`dsv4 bench` drops each mode's model, cycles and all, before the next mode's opens."""
    import gc
    import weakref

    from click.testing import CliRunner

    from dsv4 import cli
    opened, real_open = [], cli._open_artifact

    def open_checked(*args, **kwargs):
        assert all(ref() is None for ref in opened), "a mode's model outlived it"
        model = real_open(*args, **kwargs)
        model.cycle = model                      # a reference back: only a collection frees it
        opened.append(weakref.ref(model))
        return model
    monkeypatch.setattr(cli, "_open_artifact", open_checked)
    gc.disable()
    try:
        result = CliRunner().invoke(cli.cli, ["bench", str(built[0]), "--compare", "eager", "--prompt-len", "4",
                                              "--new", "2"])
    finally:
        gc.enable()
    assert result.exit_code == 0, result.output
    assert len(opened) == 2 and opened[-1]() is None


@pytest.mark.slow
def test_paged_bench_reports_prefetch_and_the_resident_run(built, tmp_path):
    """`dsv4 bench --expert-slots`: the paged run with route prediction, with hash-layer prefetch only, with no
    prefetch, admitting every miss, and the all-resident run, in one process; the same greedy tokens in all, and each paged
    mode's decode time lost to paging."""
    import json
    out, _, _ = built
    report = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "dsv4.cli", "bench", str(out), "--compare", "none", "--expert-slots",
                        "20", "--prompt-len", "4", "--new", "4", "--json", str(report)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = json.loads(report.read_text())
    assert set(got["modes"]) == {"compiled", "compiled-no-prediction", "compiled-no-prefetch", "compiled-admit-always",
                                 "compiled-resident"}
    assert got["tokens_agree"]
    assert "pager" not in got["modes"]["compiled-resident"]
    spec = got["modes"]["compiled-resident"]["speculative"]       # drafts where the experts are resident
    assert spec["pays_above_acceptance"] == pytest.approx(
        spec["accepted_pass_ms"] / got["modes"]["compiled-resident"]["decode_step_ms"] - 1)
    assert "drafts pay above" in r.stdout or "drafts cannot pay" in r.stdout
    for name in ("compiled", "compiled-no-prediction", "compiled-no-prefetch", "compiled-admit-always"):
        pager = got["modes"][name]["pager"]
        assert pager["slots"] == 20 and "time_lost_to_paging_s" in pager
        assert pager["hits"] + pager["misses"] == 3 * 5 * 6     # the timed run's 3 decode steps x 5 layers x 6
    for figures in got["modes"].values():                      # the first (cold) prompt is reported apart
        assert figures["cold_time_to_first_token_s"] > 0 and figures["time_to_first_token_s"] > 0
    assert got["modes"]["compiled"]["pager"]["prefetch_hits"] > 0
    assert got["modes"]["compiled"]["pager"]["experts_predicted_for"] == 3 * 2 * 6      # layers 3 and 4
    assert got["modes"]["compiled-no-prediction"]["pager"]["experts_predicted_for"] == 0
    assert got["modes"]["compiled-no-prefetch"]["pager"]["prefetch_hits"] == 0
    always = got["modes"]["compiled-admit-always"]["pager"]
    assert 0 < always["admissions"] <= always["misses"]        # misses copied in (the last step's after the run)
