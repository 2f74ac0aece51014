"""Training configuration: a TOML file (or a preset shipped in ``mamba_deploy/presets``) → ``TrainConfig``.

The file has one table per concern; every key is optional except what the data kind needs::

    name = "induction-tiny"
    [model]      # family = "mamba1" (default) | "mamba2" | "falcon_mamba", then any field of that family's config
                 # (d_model, n_layer, d_state, expand, headdim, ngroups, ...); vocab_size comes from the data
    [data]       # kind = "induction" | "copying" | "text", seq_len, task knobs or text path/tokenizer
    [optimizer]  # AdamW: lr, betas, eps, weight_decay, grad_clip
    [schedule]   # linear warmup then cosine decay to lr·min_lr_ratio
    [train]      # max_steps, batch_size (per process), seed, device, precision, scan_backend, logging/checkpoints
    [eval]       # every, samples, lengths (parallel forward), step_lengths (recurrent, through model.step)

Unknown tables or keys are errors (a typo must not silently fall back to a default). Overrides from the command
line use dotted keys: ``train.max_steps=100``.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import typing
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TASKS = ("induction", "copying", "text")


@dataclasses.dataclass
class DataConfig:
    kind: str = "induction"
    seq_len: int = 256             # training sequence length (tokens fed to the model)
    vocab: int = 16                # synthetic tasks: alphabet size as in the paper (specials included, see data.py)
    n_memorize: int = 16           # copying: number of data tokens to remember (M)
    path: str = ""                 # text: a UTF-8 text file
    tokenizer: str = "bytes"       # text: "bytes" (256 symbols) or a local tokenizer.json
    val_fraction: float = 0.05     # text: the tail of the file held out for evaluation


@dataclasses.dataclass
class OptimizerConfig:
    lr: float = 1e-3
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1      # not applied to norms, biases, A_log, D
    grad_clip: float = 1.0         # max global grad norm; 0 disables


@dataclasses.dataclass
class ScheduleConfig:
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1      # cosine ends at lr·min_lr_ratio


@dataclasses.dataclass
class TrainSection:
    max_steps: int = 1000
    batch_size: int = 32           # sequences per process per step
    seed: int = 0
    device: str = "auto"           # auto | cpu | cuda
    precision: str = "auto"        # auto (bf16 autocast on cuda, fp32 on cpu) | bf16 | fp32
    scan_backend: str = "auto"     # auto (triton on cuda if it works, else chunked) | chunked | triton | reference
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 3      # older step-* directories are removed; 0 keeps all
    max_minutes: float = 0.0       # stop (and checkpoint) after this much wall time; 0 = no limit


@dataclasses.dataclass
class EvalConfig:
    every: int = 200
    samples: int = 512             # validation sequences (synthetic) or windows (text), fixed across evaluations
    batch_size: int = 128
    lengths: list = dataclasses.field(default_factory=list)       # parallel-forward eval lengths ([] → seq_len)
    step_lengths: list = dataclasses.field(default_factory=list)  # recurrent eval (model.step) at the end
    # in both lists, 0 stands for the training length (data.seq_len)
    step_samples: int = 256
    stop_at_accuracy: float = 0.0  # stop early once the training-length accuracy reaches this; 0 disables


@dataclasses.dataclass
class TrainConfig:
    name: str = "run"
    model: dict = dataclasses.field(default_factory=dict)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def eval_lengths(self) -> list[int]:
        """Parallel-forward evaluation lengths; the first is the one early stopping and the progress bar use."""
        return list(dict.fromkeys(L or self.data.seq_len for L in self.eval.lengths)) or [self.data.seq_len]

    def step_eval_lengths(self) -> list[int]:
        return list(dict.fromkeys(L or self.data.seq_len for L in self.eval.step_lengths))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["optimizer"]["betas"] = list(d["optimizer"]["betas"])
        return d

    def to_toml(self) -> str:
        return dumps_toml(self.to_dict())

    def model_config(self, vocab_size: int):
        """The family's config (``family`` key, default mamba1) from the [model] table; vocab_size from the data
        unless the table sets it."""
        from ..families import FAMILIES

        table = dict(self.model)
        family = table.pop("family", "mamba1")
        if family not in FAMILIES:
            raise UserError(f"[model] family '{family}' is not one of {', '.join(FAMILIES)}")
        config_class = FAMILIES[family].config_class
        fields = {f.name for f in dataclasses.fields(config_class)}
        unknown = set(table) - fields
        if unknown:
            raise UserError(f"[model] has unknown keys {sorted(unknown)} for family {family}; valid keys: "
                            f"family, {', '.join(sorted(fields))}")
        kw = {"vocab_size": vocab_size, **table}
        if kw["vocab_size"] < vocab_size:
            raise UserError(f"[model] vocab_size {kw['vocab_size']} is smaller than the data's vocabulary "
                            f"({vocab_size})")
        for k in ("d_model", "n_layer"):
            if k not in kw:
                raise UserError(f"[model] must set {k}")
        return config_class(**kw)


SECTIONS = {"data": DataConfig, "optimizer": OptimizerConfig, "schedule": ScheduleConfig,
            "train": TrainSection, "eval": EvalConfig}


# ---- reading ---------------------------------------------------------------------------------------------------
def preset_names() -> list[str]:
    root = resources.files("mamba_deploy") / "presets"
    try:
        return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))
    except FileNotFoundError:
        return []


def _read_source(name_or_file: str) -> tuple[str, str, str]:
    """(toml text, where it came from, default run name)."""
    path = Path(name_or_file).expanduser()
    if path.is_file():
        try:
            return path.read_text(), str(path), path.stem
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read config file {path}: {e}") from None
    if path.suffix == ".toml" or "/" in name_or_file:
        raise UserError(f"config file {path} does not exist")
    if name_or_file in preset_names():
        text = (resources.files("mamba_deploy") / "presets" / f"{name_or_file}.toml").read_text()
        return text, f"preset {name_or_file}", name_or_file
    raise UserError(f"'{name_or_file}' is neither a config file nor a preset; presets: {', '.join(preset_names())}")


def _coerce(section: str, key: str, value: Any, typ) -> Any:
    where = f"[{section}] {key}" if section else key
    origin = typing.get_origin(typ) or typ
    if isinstance(typ, str):  # postponed annotations
        origin = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "tuple": tuple,
                  "dict": dict}[typ]
    if origin is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false, got {value!r}")
        return value
    if origin is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where} must be an integer, got {value!r}")
        return value
    if origin is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where} must be a number, got {value!r}")
        return float(value)
    if origin is str:
        if not isinstance(value, str):
            raise UserError(f"{where} must be a string, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise UserError(f"{where} must be a list, got {value!r}")
        return tuple(value) if origin is tuple else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where} must be a table, got {value!r}")
        return value
    return value


def _build_section(section: str, cls, raw: Any):
    if not isinstance(raw, dict):
        raise UserError(f"[{section}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(raw) - set(fields)
    if unknown:
        raise UserError(f"[{section}] has unknown keys {sorted(unknown)}; valid keys: {', '.join(fields)}")
    return cls(**{k: _coerce(section, k, v, fields[k].type) for k, v in raw.items()})


def parse_config(raw: dict[str, Any], default_name: str = "run") -> TrainConfig:
    unknown = set(raw) - set(SECTIONS) - {"name", "model"}
    if unknown:
        raise UserError(f"config has unknown tables or keys {sorted(unknown)}; valid: name, model, "
                        f"{', '.join(SECTIONS)}")
    model = raw.get("model", {})
    if not isinstance(model, dict):
        raise UserError("[model] must be a table")
    name = raw.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise UserError(f"name must be a non-empty string, got {name!r}")
    cfg = TrainConfig(name=name, model=dict(model),
                      **{s: _build_section(s, cls, raw.get(s, {})) for s, cls in SECTIONS.items()})
    validate(cfg)
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` → (["section", "key"], value); value parsed as TOML (bare words are strings)."""
    if "=" not in text:
        raise UserError(f"override '{text}' must look like section.key=value (e.g. train.max_steps=100)")
    key, value = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise UserError(f"override '{text}' has an empty key part")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return path, parsed


def apply_overrides(raw: dict[str, Any], overrides: list[tuple[list[str], Any]]) -> dict[str, Any]:
    for path, value in overrides:
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {'.'.join(path)}: {part} is not a table")
        node[path[-1]] = value
    return raw


def load_config(name_or_file: str, overrides: list[tuple[list[str], Any]] = ()) -> TrainConfig:
    """Read a preset name or TOML path, apply dotted-key overrides, validate."""
    text, where, default_name = _read_source(name_or_file)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{where} is not valid TOML: {e}") from None
    return parse_config(apply_overrides(raw, list(overrides)), default_name=default_name)


def validate(cfg: TrainConfig) -> None:
    d, t, o, s, e = cfg.data, cfg.train, cfg.optimizer, cfg.schedule, cfg.eval
    if d.kind not in TASKS:
        raise UserError(f"[data] kind must be one of {', '.join(TASKS)}, got '{d.kind}'")
    checks = [
        (d.seq_len >= 2, "[data] seq_len must be at least 2"),
        (t.max_steps >= 1, "[train] max_steps must be at least 1"),
        (t.batch_size >= 1, "[train] batch_size must be at least 1"),
        (t.log_every >= 1, "[train] log_every must be at least 1"),
        (t.checkpoint_every >= 1, "[train] checkpoint_every must be at least 1"),
        (t.keep_checkpoints >= 0, "[train] keep_checkpoints must be >= 0"),
        (t.device in ("auto", "cpu", "cuda"), f"[train] device must be auto, cpu or cuda, got '{t.device}'"),
        (t.precision in ("auto", "bf16", "fp32"), f"[train] precision must be auto, bf16 or fp32, got '{t.precision}'"),
        (t.scan_backend in ("auto", "chunked", "triton", "reference"),
         f"[train] scan_backend must be auto, chunked, triton or reference, got '{t.scan_backend}'"),
        (o.lr > 0, "[optimizer] lr must be positive"),
        (len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "[optimizer] betas must be two numbers in [0, 1)"),
        (o.weight_decay >= 0 and o.grad_clip >= 0, "[optimizer] weight_decay and grad_clip must be >= 0"),
        (s.warmup_steps >= 0 and 0 <= s.min_lr_ratio <= 1,
         "[schedule] warmup_steps must be >= 0 and min_lr_ratio in [0, 1]"),
        (e.every >= 1 and e.samples >= 1 and e.batch_size >= 1 and e.step_samples >= 1,
         "[eval] every, samples, batch_size and step_samples must be at least 1"),
        (all(isinstance(L, int) and not isinstance(L, bool) and (L >= 2 or L == 0)
             for L in [*e.lengths, *e.step_lengths]),
         "[eval] lengths and step_lengths must be integers >= 2 (or 0: the training length)"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)
    if d.kind == "copying" and d.seq_len < 2 * d.n_memorize + 1:
        raise UserError(f"[data] copying needs seq_len >= 2·n_memorize + 1 = {2 * d.n_memorize + 1}")
    if d.kind in ("induction", "copying") and d.vocab < 4:
        raise UserError("[data] vocab must be at least 4 for the synthetic tasks")
    if d.kind == "text" and not d.path:
        raise UserError("[data] kind = \"text\" needs a path: set data.path in the config or pass --data FILE")


# ---- writing ---------------------------------------------------------------------------------------------------
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dumps_toml(d: dict[str, Any]) -> str:
    """A flat two-level TOML writer (top-level scalars, then one table per dict) — enough for TrainConfig."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, dict)]
    for k, v in d.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"] + [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"
