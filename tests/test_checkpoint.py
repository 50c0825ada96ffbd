import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from builder.checkpoint import INDEX_FILE, Checkpoint, CheckpointError
from builder.layout import checkpoint_specs


@pytest.fixture
def damaged(tiny_dir, tmp_path):
    """A private copy of the tiny checkpoint to damage."""
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, out)
    return out


def _shard_of(folder, name):
    return folder / json.loads((folder / INDEX_FILE).read_text())["weight_map"][name]


def test_tiny_checkpoint_has_the_official_layout(tiny_dir):
    ck = Checkpoint(tiny_dir)
    specs = checkpoint_specs(ck.config)
    assert set(ck.entries) == {s.name for s in specs}
    w = ck.get("layers.3.ffn.experts.5.w2.weight")
    assert w.dtype == torch.int8 and w.shape == (256, 64)
    assert ck.get("layers.0.ffn.gate.tid2eid").dtype == torch.int64
    assert ck.get("layers.2.attn.wq_b.scale").dtype == torch.float8_e8m0fnu
    assert ck.get("mtp.0.e_proj.weight").dtype == torch.float8_e4m3fn
    assert len(list(tiny_dir.glob("*.safetensors"))) > 1


def test_truncated_shard_is_named(damaged):
    shard = _shard_of(damaged, "layers.1.attn.wq_a.weight")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=f"shard {shard.name} is truncated"):
        Checkpoint(damaged)


def test_read_bytes_are_the_stored_tensor_from_any_thread_and_a_shard_cut_later_is_named(damaged):
    from concurrent.futures import ThreadPoolExecutor
    ck = Checkpoint(damaged)
    names = ["layers.3.ffn.experts.5.w2.weight", "layers.3.ffn.experts.5.w2.scale", "layers.2.attn.wq_b.weight",
             "embed.weight"]
    expect = [ck.get(n).contiguous().view(torch.uint8).numpy().tobytes() for n in names]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(ck.read_bytes, names * 8))
    assert got == expect * 8
    shard = _shard_of(damaged, "layers.1.attn.wq_a.weight")   # cut after opening: the read names it
    last = max((e for e in ck.entries.values() if e.shard == shard.name), key=lambda e: e.end)
    name = next(n for n, e in ck.entries.items() if e is last)
    with shard.open("r+b") as f:
        f.truncate(last.end - 10)
    with pytest.raises(CheckpointError, match=f"shard {shard.name} is truncated: tensor '{name}'"):
        ck.read_bytes(name)


def _rewrite(shard, change):
    tensors = load_file(str(shard))
    change(tensors)
    save_file(tensors, str(shard))


def test_missing_tensor_is_named(damaged):
    name = "layers.2.attn.indexer.compressor.ape"
    shard = _shard_of(damaged, name)
    _rewrite(shard, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=f"'{name}'.*{shard.name}"):
        Checkpoint(damaged)
    # and when the index no longer lists it either
    index = json.loads((damaged / INDEX_FILE).read_text())
    del index["weight_map"][name]
    (damaged / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"tensor '{name}' is missing"):
        Checkpoint(damaged)


def test_wrong_dtype_is_named(damaged):
    name = "layers.0.attn.wkv.weight"
    shard = _shard_of(damaged, name)
    _rewrite(shard, lambda t: t.__setitem__(name, t[name].to(torch.bfloat16)))
    with pytest.raises(CheckpointError, match=f"'{name}' in shard {shard.name} has dtype BF16, expected F8_E4M3"):
        Checkpoint(damaged)


def test_wrong_shape_and_unexpected_tensor(damaged):
    name = "norm.weight"
    shard = _shard_of(damaged, name)
    _rewrite(shard, lambda t: t.__setitem__("extra.weight", torch.zeros(2)))
    index = json.loads((damaged / INDEX_FILE).read_text())
    index["weight_map"]["extra.weight"] = shard.name
    (damaged / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="unexpected tensor 'extra.weight'"):
        Checkpoint(damaged)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "dsv4.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("damage", ["truncate", "missing-config-field", "wrong-dtype", "missing-tensor"])
def test_cli_reports_one_line_and_fails(damaged, damage):
    if damage == "truncate":
        shard = _shard_of(damaged, "head.weight")
        shard.write_bytes(shard.read_bytes()[:100])
        expect = "truncated"
    elif damage == "missing-config-field":
        cfg = json.loads((damaged / "config.json").read_text())
        del cfg["q_lora_rank"]
        (damaged / "config.json").write_text(json.dumps(cfg))
        expect = "q_lora_rank"
    elif damage == "wrong-dtype":
        name = "layers.4.ffn.gate.bias"
        _rewrite(_shard_of(damaged, name), lambda t: t.__setitem__(name, t[name].to(torch.bfloat16)))
        expect = name
    else:
        name = "layers.3.ffn.experts.7.w3.scale"
        _rewrite(_shard_of(damaged, name), lambda t: t.pop(name))
        expect = name
    r = _cli("inspect", "--checkpoint", str(damaged))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_a_hash_table_naming_an_expert_the_layer_lacks_is_refused_at_build(damaged):
    """tid2eid's ids reach the MoE's expert table unchecked on the GPU (an out-of-range one faults the decode
    step with an illegal address), so the build refuses them, naming the tensor."""
    from builder.programs.decode import layer_weights
    name = "layers.1.ffn.gate.tid2eid"
    ck = Checkpoint(damaged)
    experts = ck.config.n_routed_experts
    assert layer_weights(ck.config, ck.get, 1, torch.float32)["ffn.gate.tid2eid"].dtype == torch.int32
    _rewrite(_shard_of(damaged, name), lambda t: t[name].__setitem__((5, 2), experts))
    ck = Checkpoint(damaged)
    with pytest.raises(CheckpointError, match=f"{name} names expert {experts}, outside 0..{experts - 1}"):
        layer_weights(ck.config, ck.get, 1, torch.float32)
