"""Loss and accuracy curves from a run's ``metrics.jsonl`` (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import json
from pathlib import Path

from ..io import atomic_write


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    rows = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill: skip it
                pass
    return rows


def _smooth(values: list[float], k: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > k:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def plot_curves(metrics_path: Path, out_png: Path, title: str = "") -> Path | None:
    """Left: training loss (raw and smoothed) and evaluation loss; right: evaluation accuracy per length and path.
    Written to a temporary file then renamed. Returns the path, or None when there is nothing to plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    if not train and not evals:
        return None
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        steps = [r["step"] for r in train]
        losses = [r["loss"] for r in train]
        ax_loss.plot(steps, losses, color="tab:blue", alpha=0.3, lw=0.8, label="train (per log interval)")
        ax_loss.plot(steps, _smooth(losses, 10), color="tab:blue", lw=1.5, label="train (smoothed)")
    series: dict[str, list[tuple[int, dict]]] = {}
    for r in evals:
        series.setdefault(r.get("name", "eval"), []).append((r["step"], r))
    for name, pts in series.items():
        ax_loss.plot([s for s, _ in pts], [r["loss"] for _, r in pts], marker="o", ms=3, lw=1, label=name)
        if any("accuracy" in r for _, r in pts):
            ax_acc.plot([s for s, _ in pts], [100 * r["accuracy"] for _, r in pts], marker="o", ms=3, lw=1,
                        label=name)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("cross-entropy (labelled positions)")
    ax_loss.set_yscale("log")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize=8)
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_ylim(0, 101)
    ax_acc.grid(alpha=0.3)
    if series:
        ax_acc.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        return atomic_write(out_png, lambda p: fig.savefig(p, dpi=110))
    finally:
        plt.close(fig)
