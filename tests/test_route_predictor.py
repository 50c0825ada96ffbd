"""The route predictor (runtime/route_predictor.py) applies a layer's own router to the streams it is given:
fed the streams that reach that layer's MoE, it must pick exactly the experts the reference routes to."""
import torch

from builder.checkpoint import Checkpoint
from builder.programs.decode import layer_weights
from builder.reference.moe import route
from plugins.oracle import hc_pre, rms_norm
from runtime.route_predictor import RoutePredictor


def test_predictor_picks_the_reference_routes_of_the_streams_it_is_given(tiny_dir):
    ckpt = Checkpoint(tiny_dir)
    cfg = ckpt.config
    layer = cfg.num_hash_layers                         # the first score-routed layer
    w = layer_weights(cfg, ckpt.get, layer, torch.float32)
    predictor = RoutePredictor(cfg, {layer: w}, batch=3, device=torch.device("cpu"))
    h = torch.randn(3, cfg.hc_mult, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    predictor.clear()
    predictor(layer, h)                                 # as the layer before it starts
    y = hc_pre(h[:, None], w["hc_ffn_fn"], w["hc_ffn_scale"], w["hc_ffn_base"], cfg)[0][:, 0]
    x = rms_norm(y, w["ffn_norm.weight"], cfg.rms_norm_eps)
    expect = route(cfg, x, w["ffn.gate.weight"], w["ffn.gate.bias"], None, torch.zeros(3, dtype=torch.long))[1]
    assert [sorted(r) for r in predictor.host_picks[0].tolist()] == [sorted(r) for r in expect.tolist()]
    picks = predictor.wait(layer)
    assert sorted(picks) == sorted(set(expect.flatten().tolist())) and len(picks) == len(set(picks))
    firsts = list(dict.fromkeys(predictor.host_picks[0][:, 0].tolist()))       # each row's best: first
    assert picks[:len(firsts)] == firsts
