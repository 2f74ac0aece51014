"""What a model family provides, and the weight-layout table the rest of the package reads.

The language model around the blocks is shared by every family (model.py): token embedding, per layer a residual
add + RMSNorm + the family's mixer, a final RMSNorm and lm_head; the recurrent state is a ``MambaState`` of per-layer
conv and SSM state lists whose per-row shapes the family gives. A family (one package under
``mamba_deploy/families/``) provides the rest through one ``Family`` object:

* its config class (``config_class``) and both config.json dialects (state-spaces and Hugging Face);
* its block, the PyTorch reference (``mixer``): ``forward`` over a sequence from a state and ``step`` for one token,
  choosing its fast kernels inside;
* its weights: ``mixer_weights`` rows, which ``weight_table`` puts between the shared rows — checkpoint names in
  both formats, shape, and the dtype the tensor has in the ONNX artifact. The checkpoint loader/saver, the ONNX
  exporter and the GPU fast path read this table; none keeps its own list of names;
* its state shapes (``state_shapes``) and extra manifest dims (``dims``);
* its ONNX graph emitter (``graph_emitter``), a subclass of ``onnx.export.LMGraphs`` that writes the mixer's nodes.

Every family config must have the shared LM fields (derive it from ``lm_config.LMConfig``, which also reads and
writes them in both config.json dialects): ``d_model, n_layer, vocab_size`` (tokenizer vocabulary),
``padded_vocab_size`` (embedding rows = logits width), ``pad_vocab_size_multiple, norm_eps, residual_in_fp32,
tie_embeddings``, a class attribute ``family`` (the registry key), and ``to_dict()`` / ``from_dict()``.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable

import torch

STATE_SPACES = "state-spaces"
HF = "hf"
DIALECTS = (STATE_SPACES, HF)

FP32 = "fp32"       # stored as fp32 in the artifact whatever the export dtype (the model upcasts before use)
ACT = "act"         # stored in the export (activation) dtype


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """One row of a family's mixer table, relative to ``backbone.layers.{i}.mixer.``.

    ``shape(config)`` gives the shape; ``present(config)`` whether the config has this tensor (optional biases);
    ``artifact`` the dtype rule in the ONNX artifact (FP32 or ACT); ``artifact_name`` / ``to_artifact`` rename and
    transform it there (e.g. A_log → A = −exp(A_log)); ``hf_name`` the Hugging Face key when it differs."""

    name: str
    shape: Callable[[Any], tuple[int, ...]]
    artifact: str = ACT
    present: Callable[[Any], bool] = lambda config: True
    artifact_name: str | None = None
    to_artifact: Callable[[torch.Tensor], torch.Tensor] | None = None
    hf_name: str | None = None


@dataclasses.dataclass(frozen=True)
class Weight:
    """One tensor of a model: ``name`` is the parameter name in MambaLM and the state-spaces checkpoint key."""

    name: str
    hf_name: str                       # key in a Hugging Face checkpoint
    shape: tuple[int, ...]
    artifact: str                      # FP32 or ACT: its dtype in the ONNX artifact
    artifact_name: str                 # initializer name in the ONNX artifact
    to_artifact: Callable[[torch.Tensor], torch.Tensor] | None = None

    def artifact_tensor(self, tensor: torch.Tensor, act_dtype: torch.dtype) -> torch.Tensor:
        """The tensor as the artifact stores it (transformed, in fp32 or the activation dtype)."""
        with torch.no_grad():
            if self.to_artifact is not None:
                tensor = self.to_artifact(tensor)
            return tensor.to(torch.float32 if self.artifact == FP32 else act_dtype)


HF_EMBEDDING = "backbone.embeddings.weight"


def weight_table(config, family: "Family | None" = None) -> list[Weight]:
    """Every tensor of the model of ``config`` in artifact order: embedding, per layer the pre-norm and the family's
    mixer rows, final norm, lm_head (absent when tied to the embedding)."""
    if family is None:
        from . import family_of
        family = family_of(config)
    v, d = config.padded_vocab_size, config.d_model

    def row(name, shape, artifact, hf_name=None, artifact_name=None, to_artifact=None):
        return Weight(name, hf_name or name, tuple(shape), artifact, artifact_name or name, to_artifact)

    rows = [row("backbone.embedding.weight", (v, d), ACT, hf_name=HF_EMBEDDING)]
    for i in range(config.n_layer):
        p = f"backbone.layers.{i}."
        rows.append(row(p + "norm.weight", (d,), FP32))
        for s in family.mixer_weights(config):
            if s.present(config):
                rows.append(row(p + "mixer." + s.name, s.shape(config), s.artifact,
                                hf_name=p + "mixer." + (s.hf_name or s.name),
                                artifact_name=p + "mixer." + (s.artifact_name or s.name), to_artifact=s.to_artifact))
    rows.append(row("backbone.norm_f.weight", (d,), FP32))
    if not config.tie_embeddings:
        rows.append(row("lm_head.weight", (v, d), ACT))
    return rows


class Family(abc.ABC):
    """A model family. Subclass it in ``families/<name>/__init__.py`` and add the instance to ``families.FAMILIES``."""

    name: str                          # registry key, manifest "family", config class attribute ``family``
    ss_layers: tuple[str, ...]         # state-spaces config.json ssm_cfg["layer"] values this family reads
    hf_model_types: tuple[str, ...]    # Hugging Face config.json model_type values this family reads
    config_class: type

    @abc.abstractmethod
    def config_from_json(self, raw: dict, dialect: str):
        """config.json (``dialect`` STATE_SPACES or HF) → config; unsupported fields are one-line UserErrors."""

    @abc.abstractmethod
    def config_to_json(self, config, dialect: str) -> dict:
        """config → config.json of ``dialect``, such that ``config_from_json`` gives ``config`` back; a field the
        dialect cannot hold is a one-line UserError naming it (nothing is dropped silently)."""

    @abc.abstractmethod
    def mixer(self, config, device=None, dtype=None) -> torch.nn.Module:
        """The block (PyTorch reference), with parameters named as ``mixer_weights``. It must offer
        ``forward(h [b, L, d_model], conv_state, ssm_state, scan_backend) -> (out, conv_state, ssm_state)`` (states
        may be None = zeros), ``step(h [b, d_model], conv_state, ssm_state) -> (out, conv_state, ssm_state)`` and
        ``resolve_scan_backend(requested, device) -> str`` (what "auto" means for its kernels)."""

    @abc.abstractmethod
    def init_mixer(self, mixer: torch.nn.Module, config, generator: torch.Generator) -> None:
        """Upstream's initialisation of one block (random weights of realistic scale), drawn from ``generator``."""

    @abc.abstractmethod
    def mixer_weights(self, config) -> list[WeightSpec]:
        """The block's rows of the weight table, in artifact order."""

    @abc.abstractmethod
    def state_shapes(self, config) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per-row (batch excluded) shapes of one layer's conv state (activation dtype) and SSM state (fp32)."""

    def dims(self, config) -> dict:
        """Extra dims for the manifest (informational: runtimes use only the shared ones and the state shapes)."""
        return {}

    @abc.abstractmethod
    def graph_emitter(self) -> type:
        """The ONNX emitter class (imported lazily: onnx is an optional dependency)."""
