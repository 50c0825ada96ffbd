import torch

from bench.gemv_outputs import compare


def test_compare_counts_the_cases_and_outputs_that_differ(tmp_path, capsys):
    saved = {"wo_b m1": torch.ones(1, 8, dtype=torch.bfloat16), "wq_b normed m2": torch.ones(2, 4, dtype=torch.bfloat16)}
    torch.save(saved, tmp_path / "a.pt")
    assert compare(tmp_path / "a.pt", tmp_path / "a.pt") == 0
    saved["wq_b normed m2"][1, 3] = 2.0
    torch.save(saved, tmp_path / "b.pt")
    assert compare(tmp_path / "a.pt", tmp_path / "b.pt") == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2] == "wo_b m1: 0 of 8 differ" and lines[-1] == "wq_b normed m2: 1 of 8 differ"
