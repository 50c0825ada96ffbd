"""Which prefill sizes `ArtifactModel._capture_prefill` captures as CUDA graphs, on the CPU: the capture itself
(`_captured`) and the device's memory are stood in for. On the GPU the same code runs in
tests/test_artifact_gpu.py."""
import pytest
import torch

from runtime.artifact import ArtifactModel
from runtime.draft import MTPDraft


def _model(budget_gib, fails=()):
    """An ArtifactModel with buckets 8 and 16 and a 64-token chunk, whose captures only run the captured
    function once (its width: the size) and are recorded; a size in `fails` raises as a capture that
    synchronised would."""
    model = ArtifactModel.__new__(ArtifactModel)
    model.prefill_buckets = {8: ["bucket-8"], 16: ["bucket-16"]}
    model.prefill_runs, model.chunk = ["chunk"], 64
    model.device, model.batch, model.budget_gib = torch.device("cpu"), 1, budget_gib
    model.prefill_graphs, model.tried, model.resets = {}, [], []
    model.drafter, model.verify_decode = None, False

    def captured(fn):
        size = fn()
        model.tried.append(size)
        if size in fails:
            raise RuntimeError(f"operation not permitted when stream is capturing\nthe C++ trace of {size}")
        return f"graph-{size}", f"logits-{size}"

    model._captured = captured
    model._prefill_through = lambda runs, padded, start_t, n_t, every=False: padded.size(1)
    model.reset = model.resets.append
    return model


@pytest.fixture
def device_gib(monkeypatch):
    """The device holds device_gib["reserved"] GiB after each capture."""
    held = {"reserved": 1.0}
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: held["reserved"] * 2**30)
    return held


def test_every_prefill_size_is_captured(device_gib):
    model = _model(budget_gib=4)
    model._capture_prefill()
    assert model.tried == [8, 16, 64]                           # the buckets and the whole chunk
    assert {s: (g[0], g[4]) for s, g in model.prefill_graphs.items()} == {
        8: ("graph-8", "logits-8"), 16: ("graph-16", "logits-16"), 64: ("graph-64", "logits-64")}


def test_a_size_that_fails_to_capture_runs_plainly_with_a_one_line_warning(device_gib):
    model = _model(budget_gib=4, fails=(8,))
    with pytest.warns(UserWarning) as caught:
        model._capture_prefill()
    assert list(model.prefill_graphs) == [16, 64] and model.resets == [1]    # the warm-ups' cache writes undone
    (warning,) = caught
    message = str(warning.message)
    assert "8-token prefill programs run without a CUDA graph" in message
    assert "stream is capturing" in message and "\n" not in message


def test_a_graph_past_the_memory_budget_is_dropped(device_gib):
    device_gib["reserved"] = 4.5
    model = _model(budget_gib=4)
    with pytest.warns(UserWarning, match="past the recipe's 4"):
        model._capture_prefill()
    assert model.tried == [8, 16, 64] and model.prefill_graphs == {}
    model = _model(budget_gib=None)                             # no budget: nothing dropped
    model._capture_prefill()
    assert list(model.prefill_graphs) == [8, 16, 64]


class _Drafter:
    """Stands in for the MTP drafter (its programs of 2 and 8 positions, the window), with its own `capture`."""
    sizes = {2: "mtp-2", 8: "mtp-8"}
    capture = MTPDraft.capture

    def __init__(self, model):
        self.model, self.graphs = model, {}

    def _run(self, padded, start_t, n_t):
        return f"draft-{padded.size(1)}"


class _Pass:
    """Stands in for greedy's drafted pass (runtime/drafted_pass.py): `compute` is what its graphs capture, one
    for a draft that ends a ratio-4 block and one for the others."""

    def __init__(self):
        self.graphs = {}

    def forms(self):
        return (True, False)

    def compute(self, ends_block):
        return "pass-end" if ends_block else "pass"


def test_the_drafts_verification_is_captured_and_drafts_that_fail_run_plainly(device_gib):
    """The verification, the MTP block's drafts of 1 and 2 positions and of its window (a turn's fill), and
    greedy's pass in both forms; a draft size that fails runs plainly, the others keep their graphs."""
    model = _model(budget_gib=4, fails=("draft-8",))
    model.drafter, model.verify_runs, model.drafted_pass = _Drafter(model), ["verify-2"], _Pass()
    with pytest.warns(UserWarning, match="the MTP block's drafts of 8 positions run without a CUDA graph"):
        model._capture_prefill()
    assert model.tried == [8, 16, 64, 2, "draft-1", "draft-2", "draft-8", "pass-end", "pass"]
    assert model.verify_graph[0] == "graph-2" and model.resets == [1]    # the failed warm-up's caches emptied
    assert {n: (g[0], g[4]) for n, g in model.drafter.graphs.items()} == {
        1: ("graph-draft-1", "logits-draft-1"), 2: ("graph-draft-2", "logits-draft-2")}
    assert model.drafted_pass.graphs == {True: ("graph-pass-end", "logits-pass-end"),
                                         False: ("graph-pass", "logits-pass")}


def test_greedys_drafted_pass_that_fails_to_capture_runs_plainly(device_gib):
    model = _model(budget_gib=4, fails=("pass",))
    model.drafter, model.verify_runs, model.drafted_pass = _Drafter(model), ["verify-2"], _Pass()
    with pytest.warns(UserWarning, match="the greedy drafted pass run without a CUDA graph"):
        model._capture_prefill()
    assert list(model.drafted_pass.graphs) == [True] and model.verify_graph[0] == "graph-2"   # the other form kept
