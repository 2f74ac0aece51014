"""The graph contract: the one place that names the custom ops, their inputs, outputs and attributes, and the
graphs' state I/O names (file names, dtypes and the manifest are in artifact.py). The exporter builds graphs from it, the TensorRT plugins take their names and fields from it, the
runtimes read it (through manifest.json), and README's contract table is generated from it.

Custom domain ``mamba_deploy`` version 1. Each op is one node, also defined as an ONNX model-local function with
a body of standard ops (ONNX Runtime runs the body; TensorRT inlines it, or maps the node to our plugin when the
plugin is registered under the same name/version/namespace and the parser flag ENABLE_PLUGIN_OVERRIDE is set).
"""
from __future__ import annotations

import dataclasses

DOMAIN = "mamba_deploy"
DOMAIN_VERSION = 1
PLUGIN_NAMESPACE = ""          # TensorRT plugin namespace (the ONNX parser looks plugins up in "")
PLUGIN_VERSION = "1"
IR_VERSION = 10                # onnxruntime 1.31 reads IR <= 13
DEFAULT_OPSET = 18


@dataclasses.dataclass(frozen=True)
class Port:
    name: str
    shape: tuple[str, ...]     # symbolic dims: b (batch), d (d_inner), N (d_state), L (sequence), H (heads),
                               # P (headdim), G (groups); "P|1": P or 1 (broadcast)
    dtype: str                 # "act" (fp32/fp16/bf16 activations) or "fp32"
    doc: str


@dataclasses.dataclass(frozen=True)
class OpSpec:
    op_type: str
    inputs: tuple[Port, ...]
    outputs: tuple[Port, ...]
    attributes: dict          # name -> default value (ints/floats); also the plugin's fields
    doc: str


_ATTRS = {"delta_softplus": 1, "softplus_threshold": 20.0}

SELECTIVE_SCAN_STEP = OpSpec(
    "SelectiveScanStep",
    inputs=(
        Port("x", ("b", "d"), "act", "conv output x_t (after SiLU)"),
        Port("delta", ("b", "d"), "act", "δ_raw = W_dt·(x_proj δ part), bias not yet added"),
        Port("A", ("d", "N"), "fp32", "A = −exp(A_log)"),
        Port("B", ("b", "N"), "act", "B_t"),
        Port("C", ("b", "N"), "act", "C_t"),
        Port("D", ("d",), "fp32", "skip connection D"),
        Port("delta_bias", ("d",), "fp32", "δ bias (dt_proj.bias)"),
        Port("z", ("b", "d"), "act", "gate z_t"),
        Port("ssm_state", ("b", "d", "N"), "fp32", "h_{t−1}"),
    ),
    outputs=(
        Port("y", ("b", "d"), "act", "y_t = (⟨h_t, C_t⟩ + D·x_t)·SiLU(z_t)"),
        Port("ssm_state_out", ("b", "d", "N"), "fp32", "h_t = exp(δA)·h_{t−1} + δ·B·x"),
    ),
    attributes=_ATTRS,
    doc="One decode step of the selective scan for a batch.",
)

SELECTIVE_SCAN = OpSpec(
    "SelectiveScan",
    inputs=(
        Port("x", ("b", "d", "L"), "act", "conv output"),
        Port("delta", ("b", "d", "L"), "act", "δ_raw (bias not yet added)"),
        Port("A", ("d", "N"), "fp32", "A = −exp(A_log)"),
        Port("B", ("b", "N", "L"), "act", "B"),
        Port("C", ("b", "N", "L"), "act", "C"),
        Port("D", ("d",), "fp32", "skip connection D"),
        Port("delta_bias", ("d",), "fp32", "δ bias"),
        Port("z", ("b", "d", "L"), "act", "gate z"),
        Port("ssm_state", ("b", "d", "N"), "fp32", "initial state h_0"),
    ),
    outputs=(
        Port("y", ("b", "d", "L"), "act", "outputs for every position"),
        Port("ssm_state_out", ("b", "d", "N"), "fp32", "final state h_L"),
    ),
    attributes=_ATTRS,
    doc="The selective scan over a sequence from a given initial state (prefill, chunked prefill, resume).",
)

# Mamba-2 (SSD): multi-head scan, H heads of P channels, B and C in G groups (head h reads group h·G/H). δ is
# discretized inside the op as δ = clip(softplus_τ(δ_raw + dt_bias), dt_min, dt_max).
_SSD_ATTRS = {"dt_softplus": 1, "softplus_threshold": 20.0, "dt_min": 0.0, "dt_max": float("inf")}

SSD_SCAN_STEP = OpSpec(
    "SSDScanStep",
    inputs=(
        Port("x", ("b", "H", "P"), "act", "conv output x_t (after SiLU), per head"),
        Port("dt", ("b", "H"), "act", "δ_raw, one per head, bias not yet added"),
        Port("A", ("H",), "fp32", "A = −exp(A_log), one per head"),
        Port("B", ("b", "G", "N"), "act", "B_t per group"),
        Port("C", ("b", "G", "N"), "act", "C_t per group"),
        Port("D", ("H", "P|1"), "fp32", "skip connection D per (head, channel), or per head as [H, 1]"),
        Port("dt_bias", ("H",), "fp32", "δ bias"),
        Port("ssm_state", ("b", "H", "P", "N"), "fp32", "h_{t−1}"),
    ),
    outputs=(
        Port("y", ("b", "H", "P"), "act", "y_t = h_t·C_t + D·x_t (the gate is applied after, in the gated RMSNorm)"),
        Port("ssm_state_out", ("b", "H", "P", "N"), "fp32", "h_t = exp(δA)·h_{t−1} + (δ·x_t) ⊗ B_t"),
    ),
    attributes=_SSD_ATTRS,
    doc="One decode step of the Mamba-2 SSD scan for a batch (all heads).",
)

SSD_SCAN = OpSpec(
    "SSDScan",
    inputs=(
        Port("x", ("b", "L", "H", "P"), "act", "conv output"),
        Port("dt", ("b", "L", "H"), "act", "δ_raw (bias not yet added)"),
        Port("A", ("H",), "fp32", "A = −exp(A_log)"),
        Port("B", ("b", "L", "G", "N"), "act", "B"),
        Port("C", ("b", "L", "G", "N"), "act", "C"),
        Port("D", ("H", "P|1"), "fp32", "skip connection D"),
        Port("dt_bias", ("H",), "fp32", "δ bias"),
        Port("ssm_state", ("b", "H", "P", "N"), "fp32", "initial state h_0"),
    ),
    outputs=(
        Port("y", ("b", "L", "H", "P"), "act", "outputs for every position"),
        Port("ssm_state_out", ("b", "H", "P", "N"), "fp32", "final state h_L"),
    ),
    attributes=_SSD_ATTRS,
    doc="The Mamba-2 SSD scan over a sequence from a given initial state (prefill, chunked prefill, resume).",
)

SSD_OPS = {op.op_type: op for op in (SSD_SCAN_STEP, SSD_SCAN)}
ALL_OPS = {op.op_type: op for op in (SELECTIVE_SCAN_STEP, SELECTIVE_SCAN, SSD_SCAN_STEP, SSD_SCAN)}
OPS = ALL_OPS   # those our TensorRT plugin implements: all four (kernels of plugins/selective_scan.h, plugins/ssd.h)


# ---- artifact I/O names (like optimum's KV cache naming) -----------------------------------------------------
def conv_state_name(i: int, out: bool = False) -> str:
    return f"conv_state_out.{i}" if out else f"conv_state.{i}"


def ssm_state_name(i: int, out: bool = False) -> str:
    return f"ssm_state_out.{i}" if out else f"ssm_state.{i}"


def state_inputs(n_layer: int) -> list[str]:
    return [n for i in range(n_layer) for n in (conv_state_name(i), ssm_state_name(i))]


def state_outputs(n_layer: int) -> list[str]:
    return [n for i in range(n_layer) for n in (conv_state_name(i, True), ssm_state_name(i, True))]


def contract_markdown() -> str:
    """Markdown tables of both ops (README's contract section is generated from this)."""
    lines = [f"Domain `{DOMAIN}` version {DOMAIN_VERSION}; attributes are also the plugin fields."]
    for op in ALL_OPS.values():
        attrs = ", ".join(f"`{k}` (default {v})" for k, v in op.attributes.items())
        lines += ["", f"**{op.op_type}** — {op.doc} Attributes: {attrs}.", "",
                  "| port | name | shape | dtype | meaning |", "|---|---|---|---|---|"]
        lines += [f"| in {i} | `{p.name}` | [{', '.join(p.shape)}] | {p.dtype} | {p.doc} |"
                  for i, p in enumerate(op.inputs)]
        lines += [f"| out {i} | `{p.name}` | [{', '.join(p.shape)}] | {p.dtype} | {p.doc} |"
                  for i, p in enumerate(op.outputs)]
    return "\n".join(lines)


if __name__ == "__main__":  # python -m mamba_deploy.onnx.contract  → README's contract tables
    print(contract_markdown())
