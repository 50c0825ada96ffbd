import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "dsv4.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("cmd", [[], ["synth"], ["inspect"], ["forced"], ["generate"]])
def test_every_command_has_help(cmd):
    r = _cli(*cmd, "--help")
    assert r.returncode == 0 and "Usage:" in r.stdout


def test_inspect_flash_config():
    r = _cli("inspect", "--model", "flash", "--budget-gib", "119")
    assert r.returncode == 0
    assert "284.33B" in r.stdout and "13.27B" in r.stdout and "does NOT fit" in r.stdout


def test_forced_writes_logits_and_compares(tiny_dir, tmp_path):
    out = tmp_path / "a.safetensors"
    (tmp_path / "forced.txt").write_text("3 4\n5, 6")
    r = _cli("forced", "--checkpoint", str(tiny_dir), "--prompt-ids", "5,17,99,300,12",
             "--forced-ids-file", str(tmp_path / "forced.txt"), "--out", str(out), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    logits = load_file(str(out))["logits"]
    assert logits.dtype == torch.float32 and logits.shape == (5, 1024)
    same = _cli("forced", "--checkpoint", str(tiny_dir), "--prompt-ids", "5 17 99 300 12",
                "--forced-ids", "3,4,5,6", "--compare", str(out), "--device", "cpu")
    assert same.returncode == 0 and "argmax agreement 5/5" in same.stdout
    other = _cli("forced", "--checkpoint", str(tiny_dir), "--prompt-ids", "5,17,99,300,13",
                 "--forced-ids", "3,4,5,6", "--compare", str(out), "--min-cosine", "0.9999", "--device", "cpu")
    assert other.returncode == 1 and "below --min-cosine" in other.stderr


@pytest.mark.parametrize("args, with_out, message", [
    (["--prompt-ids", "1,x"], True, "'x' is not a token id"),
    (["--prompt-ids", "1,99999"], True, "outside the vocabulary"),
    (["--prompt-ids", "1"], False, "give --out, --compare or both"),
    (["--prompt-ids-file", "/nonexistent/ids.txt"], True, "no file at"),
    (["--prompt-ids", "1", "--pairs"], True, "--pairs feeds an artifact's verification of drafts"),
], ids=["not-an-id", "out-of-vocab", "no-output", "missing-ids-file", "pairs-without-artifact"])
def test_forced_user_errors(tiny_dir, tmp_path, args, with_out, message):
    out = ["--out", str(tmp_path / "o.safetensors")] if with_out else []
    r = _cli("forced", "--checkpoint", str(tiny_dir), *args, *out)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_generate_streams_text(tiny_dir):
    r = _cli("generate", "--checkpoint", str(tiny_dir), "--prompt", "Hello", "--chat", "--max-new", "4",
             "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "decode" in r.stderr and "tok/s" in r.stderr
