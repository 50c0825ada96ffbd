import pytest
import torch

from plugins.formats import (
    e2m1_codes,
    e8m0_to_float,
    float_to_e8m0,
    fp4_act_roundtrip,
    fp8_act_roundtrip,
    fp8_weight_dequant,
    fp8_weight_quant,
    mxfp4_dequant,
    mxfp4_quant,
    pack_e2m1,
    round_to_e2m1,
    unpack_e2m1,
)


def test_e2m1_packing_low_nibble_first():
    codes = torch.tensor([[0x1, 0x2, 0xF, 0x8]], dtype=torch.uint8)
    packed = pack_e2m1(codes)
    assert packed.view(torch.uint8).tolist() == [[0x21, 0x8F]]
    assert torch.equal(unpack_e2m1(packed), codes)


def test_mxfp4_dequant_hand_computed():
    # byte 0x21: element 0 = code 1 (0.5), element 1 = code 2 (1.0); byte 0xCB: 0xB = -1.5, 0xC = -2.0
    packed = torch.tensor([[0x21, 0xCB] + [0] * 14], dtype=torch.uint8).view(torch.int8)
    scale = torch.tensor([[128]], dtype=torch.uint8).view(torch.float8_e8m0fnu)     # 2^(128-127) = 2
    w = mxfp4_dequant(packed, scale)
    assert w.shape == (1, 32)
    assert w[0, :4].tolist() == [1.0, 2.0, -3.0, -4.0]
    assert w[0, 4:].abs().sum() == 0


def test_e2m1_rounds_half_to_even():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, 5.1, 0.26, -0.25, 6.0])
    assert round_to_e2m1(x).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -4.0, 6.0, 0.5, 0.0, 6.0]
    assert e2m1_codes(torch.tensor([-0.5])).item() == 0x9


def test_e8m0_scales():
    s = torch.tensor([127, 126, 130, 0x80], dtype=torch.uint8).view(torch.float8_e8m0fnu)
    assert e8m0_to_float(s).tolist() == [1.0, 0.5, 8.0, 2.0]
    assert float_to_e8m0(torch.tensor([0.25])).view(torch.uint8).item() == 125
    with pytest.raises(ValueError):
        float_to_e8m0(torch.tensor([0.3]))


def test_fp8_weight_dequant_hand_computed():
    w = torch.tensor([[1.0, -2.0], [0.5, 448.0]]).to(torch.float8_e4m3fn)
    assert w.view(torch.uint8)[0, 0].item() == 0x38                              # e4m3 1.0
    s = torch.tensor([[126]], dtype=torch.uint8).view(torch.float8_e8m0fnu)        # 0.5 for the whole block
    assert fp8_weight_dequant(w, s).tolist() == [[0.5, -1.0], [0.25, 224.0]]


def test_fp8_weight_quant_round_trips_blocks():
    w = torch.randn(200, 300) * 0.02
    q, s = fp8_weight_quant(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (2, 3)
    back = fp8_weight_dequant(q, s)
    assert torch.allclose(back, w, rtol=0.07, atol=1e-6)


def test_fp8_activation_roundtrip_hand_computed():
    x = torch.zeros(128)
    x[0], x[1], x[2] = 3.0, 0.1, -0.0301
    y = fp8_act_roundtrip(x[None])[0]
    # amax 3 -> scale 2^ceil(log2(3/448)) = 2^-7; 0.1*128 = 12.8 -> e4m3 13; -0.0301*128 = -3.8528 -> -3.75
    assert y[:3].tolist() == [3.0, 13 / 128, -3.75 / 128]
    assert fp8_act_roundtrip(torch.zeros(1, 128)).abs().sum() == 0                # amax floored at 1e-4


def test_fp4_activation_roundtrip_hand_computed():
    x = torch.zeros(32)
    x[0], x[1], x[2] = 6.0, 2.5, -0.75
    assert fp4_act_roundtrip(x[None])[0, :3].tolist() == [6.0, 2.0, -1.0]
    x[0] = 12.0                                                                  # scale 2: 2.5/2 = 1.25 -> 1.0
    assert fp4_act_roundtrip(x[None])[0, :3].tolist() == [12.0, 2.0, -1.0]


def test_mxfp4_quant_lands_on_grid():
    w = torch.randn(4, 64)
    packed, s = mxfp4_quant(w)
    back = mxfp4_dequant(packed, s)
    scale = e8m0_to_float(s).repeat_interleave(32, -1)
    assert torch.equal(round_to_e2m1(back / scale), back / scale)
    assert torch.allclose(back, w, rtol=0.3, atol=0.3)
