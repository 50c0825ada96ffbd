"""The read-ceiling calibration kernel (plugins/csrc/stream_read.cu) reads every word it is given once."""
import numpy as np
import pytest
import torch

from bench.read_ceiling import THREADS, read_once
from plugins.loader import kernels


@pytest.mark.gpu
@pytest.mark.parametrize("words", [pytest.param(1, id="one-word"), pytest.param(1027, id="odd-tail"),
                                   pytest.param(3 << 18, id="12MiB")])
@pytest.mark.parametrize("routed", [pytest.param(False, id="plain"), pytest.param(True, id="routed")])
def test_plain_read_sees_every_word_once(words, routed):
    data = torch.randint(-2**31, 2**31 - 1, (4 * words,), dtype=torch.int32, generator=torch.Generator().manual_seed(words))
    grid = kernels().resident("dsv4_stream_read", THREADS)
    sink = torch.zeros(grid, dtype=torch.int32, device="cuda")
    on_gpu = data.cuda()
    if routed:   # the words at table[ids[0]] + 0: expert 1 of a table whose other entry points elsewhere
        table = torch.tensor([on_gpu.data_ptr() + 4096, on_gpu.data_ptr()], dtype=torch.uint64, device="cuda")
        read_once(0, 16 * words, sink, grid, (torch.ones(1, dtype=torch.int32, device="cuda"), table))
    else:
        read_once(on_gpu.data_ptr(), 16 * words, sink, grid)
    assert int(np.bitwise_xor.reduce(sink.cpu().numpy())) == int(np.bitwise_xor.reduce(data.numpy()))


def test_read_ceiling_lines_read_the_kernels_bytes():
    """Each line reads what its kernels must: the MoE the 6 experts' whole bank bytes, the layer the 212.3 MB
    bench/kernels.py's decode layer counts, and the shared expert's pair is its two GEMVs in order."""
    from bench.read_ceiling import lines
    from plugins.moe_experts import expert_nbytes
    got = lines()
    assert sum(got["moe_decode"]) == 6 * expert_nbytes(4096, 2048)
    assert sum(got["decode_layer"]) == 212_344_704
    assert got["shared_expert"] == got["shared_w13"] + got["shared_w2"]
    assert got["wq_b"] == got["wo_b"] == [32768 * 1024 + 256 * 8]


def test_the_routed_read_is_gate_ups_launch():
    """The routed read (reads only after its wait and an id and table lookup) stands in for the MoE's gate_up
    launch, 6 experts' w1 | w3 with their scales, in each line that has the routed experts."""
    from bench.read_ceiling import ROUTED_LAUNCH, lines
    got = lines()
    gate_up = 6 * 2 * (2048 * 4096 // 2 + 2048 * 4096 // 32)
    assert ROUTED_LAUNCH and all(got[line][i] == gate_up for line, i in ROUTED_LAUNCH.items())


@pytest.mark.gpu
@pytest.mark.parametrize("words", [pytest.param(1, id="one-word"), pytest.param(1027, id="odd-tail"),
                                   pytest.param(3 << 18, id="12MiB")])
@pytest.mark.parametrize("form", ["ring:8:3:8:2", "ring:4:4:4:3", "ring:3:2:1:1"])
def test_ring_read_sees_every_word_once(words, form):
    """The cp.async ring form of the read (--read-form ring:...) reads every word once too, whatever its steps."""
    from bench.read_ceiling import PlainRead, parse_read_form
    data = torch.randint(-2**31, 2**31 - 1, (4 * words,), dtype=torch.int32, generator=torch.Generator().manual_seed(words))
    reader = PlainRead(parse_read_form(form))
    on_gpu = data.cuda()
    reader.pool = on_gpu                         # read the data where the pool would be
    reader.launch(16 * words)
    assert int(np.bitwise_xor.reduce(reader.sink.cpu().numpy())) == int(np.bitwise_xor.reduce(data.numpy()))


def test_read_form_parses_and_refuses():
    from bench.read_ceiling import parse_read_form
    assert parse_read_form("ldg") is None and parse_read_form("ring:8:3:8:2") == (8, 3, 8, 2)
    for bad in ("ring:8:3:8", "ring:0:3:8:2", "ring:8:9:8:2", "rng:8:3:8:2"):
        with pytest.raises(SystemExit):
            parse_read_form(bad)
