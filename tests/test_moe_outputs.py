import torch

from bench.moe_outputs import compare


def test_compare_counts_the_outputs_that_differ_between_two_builds(tmp_path, capsys):
    saved = {t: {"h": torch.ones(3, 4, dtype=torch.bfloat16), "y": torch.ones(t, 4), "cos": torch.tensor([1.0])}
             for t in (1, 2)}
    torch.save(saved, tmp_path / "a.pt")
    saved[2]["y"][1, 3] = 1.5
    torch.save(saved, tmp_path / "b.pt")
    compare(tmp_path / "a.pt", tmp_path / "b.pt")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("tokens 1 h: 0 of 12 differ") and lines[1].startswith("tokens 1 y: 0 of 4 differ")
    assert lines[3].startswith("tokens 2 y: 1 of 8 differ; max rel 0.5")
