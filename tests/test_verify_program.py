"""The verification program (builder/programs/verify.py) against two decode steps of the decode program, in
float32 on the CPU (the ops' oracles): the same outputs and the same caches, bit for bit, wherever the two
tokens end a compressor block or not."""
import re
import zipfile

import pytest
import torch

from builder.checkpoint import Checkpoint
from builder.programs.decode import expert_table, layer_weights, make_program, new_caches
from builder.programs.verify import VerifyLayer

MAX_LEN = 320


@pytest.fixture(scope="module")
def ckpt(tiny_dir):
    return Checkpoint(tiny_dir)


@pytest.mark.parametrize("q", [126, 129, 130], ids=["second-ends-128-and-4", "first-ends-4", "second-ends-4"])
@pytest.mark.parametrize("layer", [0, 2, 3, 4], ids=["hash-ratio0", "hash-ratio4-indexer", "ratio128", "ratio4"])
def test_two_tokens_verified_equal_two_decode_steps(ckpt, layer, q):
    cfg = ckpt.config
    decode = make_program(cfg, layer, torch.float32, MAX_LEN)
    verify = VerifyLayer(cfg, layer, torch.float32, MAX_LEN)
    weights = layer_weights(cfg, ckpt.get, layer, torch.float32)
    table, keep = expert_table(ckpt.get, cfg, layer)
    g = torch.Generator().manual_seed(layer)
    h = torch.randn(q + 2, 1, cfg.hc_mult, cfg.hidden_size, generator=g)
    ids = torch.randint(0, 900, (q + 2, 1), generator=g)
    caches = new_caches(cfg, layer, 1, MAX_LEN, torch.float32)
    for p in range(q):                                 # a history: the window wrapped, blocks completed
        decode(h[p], torch.tensor([p]), ids[p], table, caches, weights)
    stepped = {k: v.clone() for k, v in caches.items()}
    expect = torch.cat([decode(h[p], torch.tensor([p]), ids[p], table, stepped, weights) for p in (q, q + 1)])
    got = verify(h[q:q + 2, 0], torch.tensor([q, q + 1]), ids[q:q + 2, 0], table, caches, weights)
    assert torch.equal(got, expect)
    for k in [k for k in caches if not torch.equal(caches[k], stepped[k])]:
        # the compressors' float64 states: a CPU BLAS may sum two rows' products in another order than one row's
        # (torch 2.11's double GEMM does, in the last column: 1 ulp), so these hold to float64 rounding only
        assert caches[k].dtype == torch.float64, k
        torch.testing.assert_close(caches[k], stepped[k], rtol=1e-13, atol=1e-13, msg=k)


@pytest.mark.slow
def test_the_verification_writes_the_window_cache_in_place(built):
    """The second token's window row is written after the first token's attention reads the cache, with no data
    path between the two; `dsv4::written_after` orders them, so AOTInductor writes the cache in place. Without
    it, every verification program copied its whole kv cache out and back around that write (two kernels named
    for the clone and the as_strided copy: computed at Flash size and 65536 positions, about 34 MB a ratio-4
    layer a verification)."""
    programs = sorted((built[0] / "programs").glob("*-verify.pt2"))
    assert programs
    for program in programs:
        with zipfile.ZipFile(program) as z:
            src = "".join(z.read(n).decode() for n in z.namelist() if n.endswith(".wrapper.cpp"))
        kernels = set(re.findall(r"void\s+(cpp_fused_\w+)\(", src))
        assert kernels and not [k for k in kernels if "clone" in k or "as_strided" in k], (program.name, kernels)


@pytest.mark.parametrize("layer", [3, 4], ids=["ratio128", "ratio4-indexer"])
def test_the_verification_runs_both_tokens_compressor_steps_on_a_side_branch(ckpt, layer):
    """As in the decode program: the compressors' products and both tokens' steps, in order, are ops of one side
    branch (`dsv4::fork_side`'s token), forked before the query path's first GEMV and joined before the first
    token's attention reads what they wrote; both tokens' indexer picks are one op."""
    cfg = ckpt.config
    verify = VerifyLayer(cfg, layer, torch.float32, MAX_LEN)
    table, _ = expert_table(ckpt.get, cfg, layer)
    args = (torch.randn(2, cfg.hc_mult, cfg.hidden_size), torch.tensor([130, 131]), torch.tensor([3, 9]), table,
            new_caches(cfg, layer, 1, MAX_LEN, torch.float32), layer_weights(cfg, ckpt.get, layer, torch.float32))
    nodes = [n for n in torch.export.export(verify, args).graph.nodes if n.op == "call_function"]
    ops = [str(n.target).removeprefix("dsv4.").removesuffix(".default") for n in nodes]
    first = {op: ops.index(op) for op in set(ops)}
    fork = nodes[first["fork_side"]]
    steps = ["compressor_step"] * (4 if layer == 4 else 2)
    assert [op for n, op in zip(nodes, ops) if fork in n.args] == ["wide_linear", *steps, "join_side"]
    assert first["fork_side"] < first["wide_linear"] < first["fp8_linear"] < first["join_side"] \
        < first["decode_attention"]
    if layer == 4:                              # both tokens' picks in one op, after the join
        assert first["join_side"] < first["indexer_picks"] and ops.count("indexer_picks") == 1
