"""Parity of backends against the PyTorch reference: a prefill and an N-step rollout compared with Polygraphy.

    reference = fp32 PyTorch model of the SOURCE checkpoint (not the artifact's weights)
    ids ~ U[0, vocab)^(B×P) from the seed
    prefill:   every runner from a zero state on ids                      → logits[B, V], state
    step t:    token_t = argmax(reference logits_{t−1})   (the same input for every runner)
               every runner feeds back ITS OWN state                       → logits, state

Because each backend carries its own state, an error in a state update compounds over the rollout and shows as a
growing error in later steps, while identical input tokens keep the runs comparable to the end. Each iteration's
outputs (``logits``, ``conv_state_out.i``, ``ssm_state_out.i`` — the artifact's output names) go into a Polygraphy
``RunResults`` and are compared with ``Comparator.compare_accuracy`` and the ``simple`` compare function
(element-wise: an element fails only if it exceeds both atol and rtol, rtol relative to the reference).
"""
from __future__ import annotations

import dataclasses
import math
import shlex
from pathlib import Path

import numpy as np
import torch

from .artifact import CHECK_STEP0_INPUTS, CHECK_STEP0_OUTPUTS, STEP_GRAPH
from .errors import UserError
from .io import atomic_write
from .model import MambaState
from .onnx.contract import conv_state_name, ssm_state_name

REFERENCE = "torch-reference"

# ---- the rollout ---------------------------------------------------------------------------------------------
def state_outputs(state: MambaState) -> dict[str, np.ndarray]:
    out = {}
    for i, (c, s) in enumerate(zip(state.conv, state.ssm)):
        out[conv_state_name(i, out=True)] = _np(c)
        out[ssm_state_name(i, out=True)] = _np(s)
    return out


def _np(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:     # numpy has no bf16; compare in fp32
        t = t.float()
    return t.numpy().copy()


def rollout(reference, backends: dict, steps: int, prompt_len: int, batch: int, seed: int, vocab_size: int,
            on_step0=None):
    """Yield ``(label, {runner: outputs})`` for the prefill and each of ``steps`` decode steps.

    ``on_step0(ids, ref_state_in, ref_outputs)`` is called with the reference's inputs and outputs of the first
    decode step (to save them for ``polygraphy run``)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, prompt_len), generator=g)
    sessions = {REFERENCE: reference, **backends}
    states, logits = {}, {}
    outs = {}
    for name, s in sessions.items():
        lg, st = s.prefill(ids, s.new_state(batch))
        logits[name], states[name] = lg, st
        outs[name] = {"logits": _np(lg), **state_outputs(st)}
    yield "prefill", outs
    for t in range(steps):
        token = logits[REFERENCE][:, :vocab_size].float().argmax(-1).cpu()
        outs = {}
        for name, s in sessions.items():
            lg, st = s.step(token, states[name])
            if t == 0 and name == REFERENCE and on_step0 is not None:
                on_step0(token, states[name], {"logits": _np(lg), **state_outputs(st)})
            logits[name], states[name] = lg, st
            outs[name] = {"logits": _np(lg), **state_outputs(st)}
        yield f"step {t + 1}", outs


# ---- comparison ----------------------------------------------------------------------------------------------
def _compare_func(atol: float, rtol: float):
    try:
        from polygraphy.comparator import SimpleCompareFunc   # polygraphy >= 0.53
        return SimpleCompareFunc(atol=atol, rtol=rtol, check_shapes=True, check_error_stat="elemwise")
    except ImportError:
        from polygraphy.comparator import CompareFunc
        return CompareFunc.simple(atol=atol, rtol=rtol, check_shapes=True, check_error_stat="elemwise")


def compare_iteration(outputs: dict[str, dict[str, np.ndarray]], compare_func) -> dict[str, dict[str, dict]]:
    """Compare every backend's outputs of one iteration against the reference with Polygraphy.
    Returns {backend: {output: {"max_abs", "max_rel", "passed"}}}."""
    from polygraphy.comparator import Comparator, IterationResult, RunResults
    from polygraphy.logger import G_LOGGER

    results = RunResults()
    names = list(outputs)                              # REFERENCE first
    for name in names:
        results.append((name, [IterationResult(outputs[name], runner_name=name)]))
    pairs = [(i, 0) for i in range(1, len(names))]     # backend vs reference: rel. error relative to reference
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        accuracy = Comparator.compare_accuracy(results, comparisons=pairs, compare_func=compare_func)
    acc = accuracy if hasattr(accuracy, "keys") else accuracy[0]   # AccuracyResult (old) / AccuracyResults (0.53+)
    report = {}
    for i, _ in pairs:
        match = acc[(names[i], REFERENCE)][0]
        per_out = {}
        for out_name in outputs[REFERENCE]:
            r = match.get(out_name)
            if r is None or isinstance(r, bool):       # missing output or shape mismatch
                per_out[out_name] = {"max_abs": math.inf, "max_rel": math.inf, "passed": False}
            else:
                per_out[out_name] = {"max_abs": float(r.max_absdiff), "max_rel": float(r.max_reldiff),
                                     "passed": bool(r)}
        report[names[i]] = per_out
        mark_nonfinite(outputs[names[i]], per_out)
    return report


def mark_nonfinite(outputs: dict[str, np.ndarray], per_out: dict[str, dict]) -> None:
    """Add each output's NaN and Inf counts to its comparison; an output with any fails, whatever the comparator
    said (NaN compares false, so an element-wise check can pass it), and its error is +inf rather than NaN (a NaN
    is dropped by max() and showed as an error of 0)."""
    for out_name, v in per_out.items():
        arr = outputs.get(out_name)
        nan = int(np.isnan(arr).sum()) if arr is not None else 0
        inf = int(np.isinf(arr).sum()) if arr is not None else 0
        v["nan"], v["inf"] = nan, inf
        if nan or inf:
            v["passed"] = False
        for key in ("max_abs", "max_rel"):
            if nan or inf or math.isnan(v[key]):
                v[key] = math.inf


def _count_nonfinite(agg: dict, v: dict, label: str) -> None:
    """Accumulate NaN/Inf counts of one output over the rollout, and the first step that had any."""
    agg["nan"] = agg.get("nan", 0) + v["nan"]
    agg["inf"] = agg.get("inf", 0) + v["inf"]
    if (v["nan"] or v["inf"]) and agg.get("first_nonfinite_step") is None:
        agg["first_nonfinite_step"] = label
    agg.setdefault("first_nonfinite_step", None)


def _nonfinite_text(members: list[dict]) -> str:
    nan, inf = sum(v["nan"] for v in members), sum(v["inf"] for v in members)
    first = next((v["first_nonfinite_step"] for v in members if v["first_nonfinite_step"]), None)
    return f"FAILED: {nan} NaN, {inf} Inf (first at {first})" if nan or inf else ""


@dataclasses.dataclass
class CheckResult:
    report: dict
    passed: bool


def _group(name: str) -> str:
    """conv_state_out.3 → conv_state_out.*  (the table groups layers; the JSON keeps each)."""
    head, _, tail = name.rpartition(".")
    return f"{head}.*" if head and tail.isdigit() else name


def run_check(reference, backends: dict, *, steps: int, prompt_len: int, batch: int, seed: int, atol: float,
              rtol: float, vocab_size: int, step0_dir: Path | None = None, state_dtype=None,
              progress: bool = True, atol_relative: bool = False) -> CheckResult:
    """Run the rollout, compare every iteration, and summarise per backend and output. ``atol_relative``: atol is
    a fraction of each reference output's largest magnitude in that iteration (weight-only quantization moves
    every output by a fraction of its own scale), else absolute."""
    from tqdm import tqdm

    compare_func = _compare_func(atol, rtol)
    step0 = {}

    def on_step0(token, state_in, outs):
        step0.update(token=token, state=state_in, outputs=outs)

    per_backend = {name: {"outputs": {}, "steps": [], "token_agreement": 0} for name in backends}
    it = rollout(reference, backends, steps, prompt_len, batch, seed, vocab_size, on_step0=on_step0)
    for label, outputs in tqdm(it, total=steps + 1, desc="rollout", unit="step", disable=not progress,
                               leave=False):
        if atol_relative:
            compare_func = _compare_func({k: atol * float(np.abs(v).max(initial=0.0))
                                          for k, v in outputs[REFERENCE].items()}, rtol)
        cmp = compare_iteration(outputs, compare_func)
        ref_tok = outputs[REFERENCE]["logits"][:, :vocab_size].argmax(-1)
        for name, per_out in cmp.items():
            b = per_backend[name]
            b["token_agreement"] += int((outputs[name]["logits"][:, :vocab_size].argmax(-1) == ref_tok).all())
            rec = {"step": label, "passed": all(v["passed"] for v in per_out.values())}
            for group in ("logits", "conv_state_out.*", "ssm_state_out.*"):
                vals = [v for k, v in per_out.items() if _group(k) == group]
                key = group.replace("_out.*", "")
                rec[f"{key}_max_abs"] = max(v["max_abs"] for v in vals)
                rec[f"{key}_max_rel"] = max(v["max_rel"] for v in vals)
                rec[f"{key}_nonfinite"] = sum(v["nan"] + v["inf"] for v in vals)
            b["steps"].append(rec)
            for out_name, v in per_out.items():
                agg = b["outputs"].setdefault(out_name, {"max_abs": 0.0, "max_rel": 0.0, "passed": True,
                                                         "first_failed_step": None, "worst_step": None})
                if v["max_abs"] >= agg["max_abs"]:
                    agg["worst_step"] = label
                agg["max_abs"] = max(agg["max_abs"], v["max_abs"])
                agg["max_rel"] = max(agg["max_rel"], v["max_rel"])
                if not v["passed"] and agg["passed"]:
                    agg["passed"], agg["first_failed_step"] = False, label
                _count_nonfinite(agg, v, label)
    for b in per_backend.values():
        b["token_agreement"] = b["token_agreement"] / (steps + 1)
        b["passed"] = all(v["passed"] for v in b["outputs"].values())
    report = {
        "steps": steps, "prompt_len": prompt_len, "batch": batch, "seed": seed,
        "tolerance": {"atol": atol, "rtol": rtol,
                      **({"atol_relative_to": "max |reference output|, per output and iteration"} if atol_relative
                         else {}),
                      "rule": "polygraphy simple/elemwise: an element fails if |x - ref| > atol and "
                              "|x - ref| / |ref| > rtol"},
        "backends": per_backend,
        "passed": all(b["passed"] for b in per_backend.values()),
    }
    if step0_dir is not None and step0:
        report["polygraphy"] = save_step0(step0_dir, step0, state_dtype)
    return CheckResult(report, report["passed"])


# ---- Polygraphy files for one step ----------------------------------------------------------------------------
def save_step0(out_dir: Path, step0: dict, state_dtype=None) -> dict:
    """Save the reference's inputs and outputs of the first decode step in Polygraphy's JSON formats
    (``--load-inputs``: a list of feed dicts; ``--load-outputs``: RunResults)."""
    from polygraphy.comparator import RunResults
    from polygraphy.json import save_json
    from polygraphy.logger import G_LOGGER

    state: MambaState = step0["state"]
    feed = {"input_ids": step0["token"].long().numpy()}
    for i, (c, s) in enumerate(zip(state.conv, state.ssm)):
        feed[conv_state_name(i)] = _np(c.to(state_dtype) if state_dtype is not None else c)
        feed[ssm_state_name(i)] = _np(s.float())
    inputs_path = out_dir / CHECK_STEP0_INPUTS
    outputs_path = out_dir / CHECK_STEP0_OUTPUTS
    results = RunResults()
    results.add([step0["outputs"]], runner_name=REFERENCE)
    with G_LOGGER.verbosity(G_LOGGER.ERROR):
        atomic_write(inputs_path, lambda p: save_json([feed], str(p), description="step inputs"))
        atomic_write(outputs_path, lambda p: results.save(str(p)))
    return {"inputs": str(inputs_path), "reference_outputs": str(outputs_path)}


def polygraphy_command(artifact: Path, files: dict, atol: float, rtol: float) -> str:
    return " ".join(shlex.quote(x) for x in [
        "polygraphy", "run", str(Path(artifact) / STEP_GRAPH), "--onnxrt",
        "--load-inputs", files["inputs"], "--load-outputs", files["reference_outputs"],
        "--atol", f"{atol:g}", "--rtol", f"{rtol:g}", "--check-error-stat", "elemwise"])


# ---- outputs: table, JSON, plot -------------------------------------------------------------------------------
def format_table(report: dict) -> str:
    """Per backend and output: max abs/rel error over all iterations, tolerance, PASSED/FAILED (Polygraphy-like).
    Per-layer state outputs are grouped (worst layer shown); the JSON report keeps each."""
    tol = report["tolerance"]
    tol_s = f"atol={tol['atol']:g}{'×max|ref|' if tol.get('atol_relative_to') else ''} rtol={tol['rtol']:g}"
    lines = []
    for name, b in report["backends"].items():
        lines.append(f"[{name} vs {REFERENCE}] {report['steps']} steps after a {report['prompt_len']}-token "
                     f"prefill, batch {report['batch']}; greedy-token agreement "
                     f"{100 * b['token_agreement']:.1f}%")
        rows = []
        groups: dict[str, list] = {}
        for out_name, v in b["outputs"].items():
            groups.setdefault(_group(out_name), []).append((out_name, v))
        for group, members in groups.items():
            worst_name, worst = max(members, key=lambda m: (m[1]["max_abs"], m[0]))
            passed = all(v["passed"] for _, v in members)
            label = group if len(members) == 1 else f"{group} (worst {worst_name})"
            failed_at = [v["first_failed_step"] for _, v in members if v["first_failed_step"]]
            nonfinite = _nonfinite_text([v for _, v in members])
            rows.append((label, f"{worst['max_abs']:.3e}", f"{max(v['max_rel'] for _, v in members):.3e}", tol_s,
                         "PASSED" if passed else nonfinite or f"FAILED (first at {failed_at[0]})"))
        header = ("output", "max abs err", "max rel err", "tolerance", "result")
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines.append(("  " + fmt.format(*header)).rstrip())
        lines += [("  " + fmt.format(*r)).rstrip() for r in rows]
        lines.append(f"  {'PASSED' if b['passed'] else 'FAILED'} | {name} vs {REFERENCE}")
    return "\n".join(lines)


def plot_nonfinite(ax, name: str, b: dict, color) -> None:
    """Mark the steps where a backend's outputs held NaN/Inf (their error is +inf, which a log plot cannot show):
    crosses at the top of the axes and a vertical line at the first one."""
    bad = [i for i, s in enumerate(b["steps"]) if any(s.get(f"{k}_nonfinite") for k in ("logits", "conv_state",
                                                                                          "ssm_state"))]
    if not bad:
        return
    ax.axvline(bad[0], color=color, linestyle="-.", alpha=0.7,
               label=f"{name}: NaN/Inf from {b['steps'][bad[0]]['step']}")
    ax.plot(bad, [1.0] * len(bad), "x", color=color, transform=ax.get_xaxis_transform(), clip_on=False)


def write_plot(report: dict, path: Path) -> None:
    """Max abs error vs step per backend: logits solid, SSM state dashed, atol dotted."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for name, b in report["backends"].items():
        x = list(range(len(b["steps"])))
        floor = 1e-12        # log scale: show exact zeros at the floor
        line, = ax.plot(x, [max(s["logits_max_abs"], floor) for s in b["steps"]], label=f"{name}: logits")
        ax.plot(x, [max(s["ssm_state_max_abs"], floor) for s in b["steps"]], linestyle="--",
                color=line.get_color(), label=f"{name}: ssm state (worst layer)")
        plot_nonfinite(ax, name, b, line.get_color())
    ax.axhline(report["tolerance"]["atol"], color="gray", linestyle=":", label="atol")
    ax.set_yscale("log")
    ax.set_xlabel("step (0 = prefill)")
    ax.set_ylabel(f"max |x − {REFERENCE}|")
    ax.set_title(f"parity vs {REFERENCE}: {report['steps']}-step rollout, batch {report['batch']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
