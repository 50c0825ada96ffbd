import pytest
import torch

from builder.checkpoint import Checkpoint
from helpers import expert_tensors
from builder.expert_bank import ALIGN, write_layer_bank
from plugins.moe_experts import pack_expert
from runtime.errors import UserError
from runtime.expert_bank import ExpertBank


@pytest.fixture(scope="module")
def bank(tiny_dir, tmp_path_factory):
    ckpt = Checkpoint(tiny_dir)
    out = tmp_path_factory.mktemp("bank")
    seen = []
    entries = [write_layer_bank(ckpt, layer, out / f"layer-{layer:03d}.experts",
                                progress=lambda i, n: seen.append((i, n))) for layer in (0, 3)]
    assert seen[-1] == (16, 16)
    return ckpt, out, entries


def test_bank_holds_each_expert_contiguous_and_aligned(bank):
    ckpt, out, entries = bank
    reader = ExpertBank(out, entries)
    entry = entries[1]
    assert entry["stride"] % ALIGN == 0 and entry["stride"] >= entry["expert_bytes"]
    p = "layers.3.ffn.experts.7."
    expect = pack_expert(*expert_tensors(ckpt, p))
    assert torch.equal(reader.expert(3, 7), expect)
    assert not list(out.glob("*.partial"))
    reader.verify()
    reader.release(3)                        # dropped from memory and page cache, read back from the file
    assert torch.equal(reader.expert(3, 7), expect)
    view = reader.expert(3, 7)               # a table entry into the map stays valid when its pages go
    reader.drop_cached(3, [7, 2])
    assert torch.equal(view, expect) and torch.equal(reader.expert(3, 7), expect)
    reader.will_need(3, [7, 2])              # read ahead (a predicted expert left cold): the same bytes
    assert torch.equal(view, expect)


def test_corrupted_expert_is_named(bank, tmp_path):
    _, out, entries = bank
    path = tmp_path / entries[0]["file"]
    data = bytearray((out / entries[0]["file"]).read_bytes())
    data[5 * entries[0]["stride"] + 10] ^= 0xFF
    path.write_bytes(bytes(data))
    reader = ExpertBank(tmp_path, entries[:1])
    with pytest.raises(UserError, match="expert 5 is corrupted"):
        reader.verify()
    path.write_bytes(bytes(data[:100]))
    with pytest.raises(UserError, match="truncated"):
        ExpertBank(tmp_path, entries[:1])
