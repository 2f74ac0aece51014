"""Weight-only quantization of the artifact's large linear layers (int8 / int4), for ONNX Runtime and TensorRT.

Quantized: ``in_proj``, ``out_proj`` and the LM head (a quantized copy of the tied embedding; the embedding lookup
keeps the fp32 table) — ≈ 97 % of the weight bytes a decode step reads. Kept fp32: ``x_proj`` and ``dt_proj``
(they produce δ, B and C, the SSM's own parameters), the conv, norms, A, D, δ bias, and all of the scan math; the
SSM state stays fp32. Weights are quantized symmetrically, per block of ``block_size`` input channels (per output
column), with ``onnxruntime.quantization``'s kernels (round-to-nearest). Two graph forms:

* ``matmulnbits`` — ``com.microsoft::MatMulNBits`` (ONNX Runtime's fused weight-only kernel; ``accuracy_level``
  4 computes int8 × intN dot products with VNNI/AVX-512 on the CPU). int4 blocks of 32 or 128; int8 blocks of
  16…256 (ORT's kernel takes power-of-two blocks; per-channel int8 is the QDQ form).
* ``qdq`` — ``DequantizeLinear`` on the int4/int8 weights, then ``MatMul``: standard ONNX (opset 21 for int4 and
  blocked scales), which TensorRT parses as weight-only quantization and ONNX Runtime fuses back into
  MatMulNBits. int4 is blocked (32/128); int8 is per output channel (``block_size`` 0).

A linear layer's weight is the checkpoint's ``[out, in]``; the graphs compute ``x · Wᵀ``, so the quantized
tensors are of ``Wᵀ`` ``[K = in, N = out]``, as MatMulNBits and MatMul want.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from onnx import TensorProto

from ..errors import UserError

QUANTIZED_LINEARS = ("in_proj", "out_proj", "lm_head")
SCHEMES = ("int8", "int4")
FORMATS = ("matmulnbits", "qdq")
MATMULNBITS_ACCURACY_LEVEL = 4     # int8 activations × intN weights (VNNI) on the CPU
QDQ_MIN_OPSET = 21                 # int4 tensors and blocked DequantizeLinear


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    scheme: str         # "int8" | "int4"
    fmt: str            # "matmulnbits" | "qdq"
    block_size: int     # input channels per scale; 0 = one scale per output channel (QDQ int8)

    @property
    def bits(self) -> int:
        return 8 if self.scheme == "int8" else 4

    def manifest(self) -> dict:
        out = {"scheme": self.scheme, "bits": self.bits, "format": self.fmt, "symmetric": True,
               "block_size": self.block_size, "granularity": "per-channel" if self.block_size == 0 else "block",
               "weights": [f"{name} (weight)" for name in QUANTIZED_LINEARS],
               "fp32": ["x_proj", "dt_proj", "embedding lookup", "conv", "norms", "A", "D", "dt bias",
                        "scan math", "SSM state"],
               "library": "onnxruntime.quantization"}
        if self.fmt == "matmulnbits":
            out["accuracy_level"] = MATMULNBITS_ACCURACY_LEVEL
        return out


def parse_quant_spec(scheme: str | None, fmt: str = "matmulnbits", block_size: int | None = None) -> QuantSpec | None:
    """The quantization asked for on the command line, validated (UserError), or None for none."""
    if scheme in (None, "none"):
        return None
    if scheme not in SCHEMES:
        raise UserError(f"--quantize {scheme!r} is not supported; choose one of {', '.join(SCHEMES)}")
    if fmt not in FORMATS:
        raise UserError(f"--quant-format {fmt!r} is not supported; choose one of {', '.join(FORMATS)}")
    if fmt == "qdq" and scheme == "int8":
        allowed, default = (0,), 0
    elif scheme == "int4":
        allowed, default = (32, 128), 32
    else:
        allowed, default = (16, 32, 64, 128, 256), 128
    block = default if block_size is None else block_size
    if block not in allowed:
        raise UserError(f"--quant-block {block} is not supported for {scheme} in {fmt} form; choose "
                        f"{' or '.join(map(str, allowed))} (0 = per output channel)")
    return QuantSpec(scheme, fmt, block)


def is_quantized(key: str) -> bool:
    """Whether the linear layer of weight prefix ``key`` (e.g. backbone.layers.3.mixer.in_proj) is quantized."""
    return key.split(".")[-1] in QUANTIZED_LINEARS


@dataclasses.dataclass
class QuantTensor:
    name: str
    data_type: int
    dims: list[int]
    raw: bytes


def quantize_weight(key: str, weight: torch.Tensor, spec: QuantSpec) -> list[QuantTensor]:
    """The quantized tensors of the linear layer ``key`` with weight ``[out, in]``: (packed weights, scales),
    named ``{key}.weight_q`` and ``{key}.weight_scale``; the node builders below use the same names."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                  DefaultWeightOnlyQuantizer)
    from onnxruntime.quantization.quant_utils import QuantFormat

    w_kn = np.ascontiguousarray(weight.detach().to(torch.float32).cpu().numpy().T)         # [K, N]
    K, N = w_kn.shape
    q_name, s_name = f"{key}.weight_q", f"{key}.weight_scale"
    if spec.fmt == "qdq" and spec.scheme == "int8":       # per output channel: scale_n = max_k |W[k, n]| / 127
        scale = np.maximum(np.abs(w_kn).max(axis=0), np.finfo(np.float32).tiny) / 127.0
        q = np.clip(np.rint(w_kn / scale), -127, 127).astype(np.int8)
        return [QuantTensor(q_name, TensorProto.INT8, [K, N], q.tobytes()),
                QuantTensor(s_name, TensorProto.FLOAT, [N], scale.astype(np.float32).tobytes())]
    fmt = QuantFormat.QDQ if spec.fmt == "qdq" else QuantFormat.QOperator
    quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(
        block_size=spec.block_size, is_symmetric=True, bits=spec.bits, quant_format=fmt,
        accuracy_level=MATMULNBITS_ACCURACY_LEVEL if spec.fmt == "matmulnbits" else None))
    packed, scales, _ = quantizer.qbits_block_quant(w_kn)
    if spec.fmt == "qdq":                                  # int4 [K, N] (two per byte), scales [K/block, N]
        return [QuantTensor(q_name, TensorProto.INT4, [K, N], packed.tobytes()),
                QuantTensor(s_name, TensorProto.FLOAT, list(scales.shape), scales.tobytes())]
    return [QuantTensor(q_name, TensorProto.UINT8, list(packed.shape), packed.tobytes()),   # [N, blocks, bytes]
            QuantTensor(s_name, TensorProto.FLOAT, list(scales.shape), scales.tobytes())]  # [N, blocks]


def linear_op(g, x: str, key: str, in_features: int, out_features: int, spec: QuantSpec, hint: str) -> str:
    """Emit ``x · Wᵀ`` for the quantized weight of ``key`` into GraphBuilder ``g``; returns the output name."""
    q_name, s_name = f"{key}.weight_q", f"{key}.weight_scale"
    if spec.fmt == "matmulnbits":
        return g.op("MatMulNBits", [x, q_name, s_name], hint, domain="com.microsoft", K=in_features,
                    N=out_features, bits=spec.bits, block_size=spec.block_size,
                    accuracy_level=MATMULNBITS_ACCURACY_LEVEL)
    attrs = {"axis": 1} if spec.block_size == 0 else {"axis": 0, "block_size": spec.block_size}
    w = g.op("DequantizeLinear", [q_name, s_name], hint + "_w", **attrs)
    return g.op("MatMul", [x, w], hint)
