"""The official checkpoint layout: every tensor name, shape and dtype a config implies.

One source of truth for checkpoint validation, synthetic checkpoints and parameter counting.
Names carry no `model.` prefix; MTP layers live under `mtp.{j}.`.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import FP8_BLOCK, MXFP4_BLOCK, ModelConfig


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str          # safetensors dtype: BF16, F32, I64, F8_E4M3, F8_E8M0, I8
    kind: str           # what the bytes are: bf16, f32, i64, fp8, fp8_scale, mxfp4, mxfp4_scale
    fan_in: int = 0     # input features of a linear weight (for initialisation and counting)

    @property
    def params(self) -> int:
        """Logical parameters: an MXFP4 byte holds two; scales are not parameters."""
        n = 1
        for d in self.shape:
            n *= d
        if self.kind in ("fp8_scale", "mxfp4_scale"):
            return 0
        return 2 * n if self.kind == "mxfp4" else n

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * {"BF16": 2, "F32": 4, "I64": 8}.get(self.dtype, 1)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _fp8(name: str, out: int, inp: int) -> list[TensorSpec]:
    return [TensorSpec(f"{name}.weight", (out, inp), "F8_E4M3", "fp8", inp),
            TensorSpec(f"{name}.scale", (_ceil(out, FP8_BLOCK), _ceil(inp, FP8_BLOCK)), "F8_E8M0", "fp8_scale")]


def _fp4(name: str, out: int, inp: int) -> list[TensorSpec]:
    return [TensorSpec(f"{name}.weight", (out, inp // 2), "I8", "mxfp4", inp),
            TensorSpec(f"{name}.scale", (out, inp // MXFP4_BLOCK), "F8_E8M0", "mxfp4_scale")]


def _bf16(name: str, *shape: int, fan_in: int = 0) -> TensorSpec:
    return TensorSpec(name, tuple(shape), "BF16", "bf16", fan_in)


def _f32(name: str, *shape: int) -> TensorSpec:
    return TensorSpec(name, tuple(shape), "F32", "f32")


def _compressor(p: str, c: ModelConfig, ratio: int, dim: int) -> list[TensorSpec]:
    coff = 2 if ratio == 4 else 1     # ratio-4 compressors overlap with the previous block
    d = c.hidden_size
    return [_bf16(f"{p}.wkv.weight", coff * dim, d, fan_in=d), _bf16(f"{p}.wgate.weight", coff * dim, d, fan_in=d),
            _f32(f"{p}.ape", ratio, coff * dim), _bf16(f"{p}.norm.weight", dim)]


def hc_specs(p: str, c: ModelConfig, which: str, rows: int, n_scale: int) -> list[TensorSpec]:
    return [_f32(f"{p}hc_{which}_fn", rows, c.hc_mult * c.hidden_size),
            _f32(f"{p}hc_{which}_base", rows), _f32(f"{p}hc_{which}_scale", n_scale)]


def expert_specs(p: str, c: ModelConfig, e: int) -> list[TensorSpec]:
    d, f = c.hidden_size, c.moe_intermediate_size
    return (_fp4(f"{p}ffn.experts.{e}.w1", f, d) + _fp4(f"{p}ffn.experts.{e}.w3", f, d)
            + _fp4(f"{p}ffn.experts.{e}.w2", d, f))


def block_specs(c: ModelConfig, layer: int, p: str) -> list[TensorSpec]:
    """Tensors of one transformer block (`p` is 'layers.N.' or 'mtp.J.'), routed experts included."""
    d, h, hd = c.hidden_size, c.num_attention_heads, c.head_dim
    ratio = c.ratio(layer)
    s = [_bf16(f"{p}attn_norm.weight", d), _bf16(f"{p}ffn_norm.weight", d)]
    s += hc_specs(p, c, "attn", c.hc_mix, 3) + hc_specs(p, c, "ffn", c.hc_mix, 3)
    a = f"{p}attn."
    s += _fp8(f"{a}wq_a", c.q_lora_rank, d) + [_bf16(f"{a}q_norm.weight", c.q_lora_rank)]
    s += _fp8(f"{a}wq_b", h * hd, c.q_lora_rank)
    s += _fp8(f"{a}wkv", hd, d) + [_bf16(f"{a}kv_norm.weight", hd)]
    s += _fp8(f"{a}wo_a", c.o_groups * c.o_lora_rank, h * hd // c.o_groups)
    s += _fp8(f"{a}wo_b", d, c.o_groups * c.o_lora_rank)
    s += [_f32(f"{a}attn_sink", h)]
    if ratio:
        s += _compressor(f"{a}compressor", c, ratio, hd)
    if ratio == 4:
        s += _fp8(f"{a}indexer.wq_b", c.index_n_heads * c.index_head_dim, c.q_lora_rank)
        s += [_bf16(f"{a}indexer.weights_proj.weight", c.index_n_heads, d, fan_in=d)]
        s += _compressor(f"{a}indexer.compressor", c, ratio, c.index_head_dim)
    s += [_bf16(f"{p}ffn.gate.weight", c.n_routed_experts, d, fan_in=d)]
    if c.is_hash_layer(layer):
        s += [TensorSpec(f"{p}ffn.gate.tid2eid", (c.vocab_size, c.num_experts_per_tok), "I64", "i64")]
    else:
        s += [_f32(f"{p}ffn.gate.bias", c.n_routed_experts)]
    for e in range(c.n_routed_experts):
        s += expert_specs(p, c, e)
    f = c.moe_intermediate_size
    s += _fp8(f"{p}ffn.shared_experts.w1", f, d) + _fp8(f"{p}ffn.shared_experts.w3", f, d)
    s += _fp8(f"{p}ffn.shared_experts.w2", d, f)
    return s


def mtp_extra_specs(c: ModelConfig, p: str) -> list[TensorSpec]:
    d = c.hidden_size
    return (_fp8(f"{p}e_proj", d, d) + _fp8(f"{p}h_proj", d, d)
            + [_bf16(f"{p}enorm.weight", d), _bf16(f"{p}hnorm.weight", d), _bf16(f"{p}norm.weight", d)]
            + hc_specs(p, c, "head", c.hc_mult, 1))


def checkpoint_specs(c: ModelConfig, include_mtp: bool = True) -> list[TensorSpec]:
    """Every tensor of the official checkpoint for `c`, in a stable order."""
    d = c.hidden_size
    s = [_bf16("embed.weight", c.vocab_size, d), _bf16("head.weight", c.vocab_size, d, fan_in=d),
         _bf16("norm.weight", d)] + hc_specs("", c, "head", c.hc_mult, 1)
    for i in range(c.num_hidden_layers):
        s += block_specs(c, i, f"layers.{i}.")
    if include_mtp:
        for j in range(c.num_nextn_predict_layers):
            p = f"mtp.{j}."
            s += block_specs(c, c.num_hidden_layers + j, p) + mtp_extra_specs(c, p)
    return s


def layer_of(name: str) -> str:
    """The group a tensor belongs to: 'layers.N', 'mtp.J' or 'global'."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] in ("layers", "mtp") else "global"
