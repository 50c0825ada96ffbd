import pytest
import torch

from plugins.head import GreedyPick


def test_greedy_pick_is_argmax_on_the_cpu():
    logits = torch.randn(3, 1000)
    assert torch.equal(GreedyPick(3, 1000, "cpu")(logits), logits.argmax(-1))


def _logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=g) * 8).cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("rows, vocab", [pytest.param(1, 129280, id="flash-vocab"),
                                         pytest.param(4, 1001, id="4rows-odd"),
                                         pytest.param(2, 3, id="narrower-than-a-warp")])
def test_greedy_pick_kernel_is_torch_argmax(rows, vocab):
    pick = GreedyPick(rows, vocab, torch.device("cuda"))
    for seed in range(3):                        # again: each launch leaves its counters at zero for the next
        logits = _logits(rows, vocab, seed)
        assert torch.equal(pick(logits), logits.argmax(-1))


@pytest.mark.gpu
def test_greedy_pick_kernel_takes_the_first_of_equal_maxima_and_nan_as_torch():
    vocab = 5000
    logits = torch.full((4, vocab), -torch.inf).cuda()
    logits[0, [17, 4000, 4999]] = 3.0                     # ties: the first
    logits[1, 2500] = float("nan")                        # a NaN wins, as in torch.argmax
    logits[1, 10] = torch.inf
    logits[2] = -1.0                                      # all equal: index 0
    logits[3, [0, 4999]] = torch.tensor([-0.0, 0.0]).cuda()  # -0 and +0 ordered as torch: equal, the first
    got = GreedyPick(4, vocab, torch.device("cuda"))(logits)
    assert got.tolist() == logits.argmax(-1).tolist()


@pytest.mark.gpu
def test_greedy_pick_kernel_replays_in_a_cuda_graph():
    rows, vocab = 1, 129280
    pick = GreedyPick(rows, vocab, torch.device("cuda"))
    logits = _logits(rows, vocab, 0)
    out = torch.empty(rows, dtype=torch.int64, device="cuda")
    pick(logits, out)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pick(logits, out)
    for seed in range(1, 4):
        logits.copy_(_logits(rows, vocab, seed))
        graph.replay()
        assert torch.equal(out, logits.argmax(-1))
