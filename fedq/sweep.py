"""Privacy/accuracy sweep: one embedded federation per noise multiplier.

For each noise multiplier the one-command federation runs with DP-SGD on every client;
the sweep records the largest ε any client spent and the final test accuracy, and writes
both as JSON and as a plot of accuracy against ε.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from coordinator.settings import CoordinatorSettings, ServiceUrls
from fedq.federation import FederationOptions, run_federation

__all__ = ["SweepResult", "plot_sweep", "run_sweep", "table_header"]

log = logging.getLogger(__name__)

JSON_NAME = "privacy_sweep.json"
PLOT_NAME = "privacy_sweep.png"


@dataclass(frozen=True)
class SweepResult:
    """The rows of a finished sweep and where they were written."""

    rows: list[dict[str, Any]]
    json_path: Path
    plot_path: Path


async def run_sweep(
    settings: CoordinatorSettings,
    noise_multipliers: Sequence[float],
    *,
    options: FederationOptions,
    out_dir: Path,
    out: TextIO | None = None,
) -> SweepResult:
    """Run one federation per noise multiplier and write ``privacy_sweep.{json,png}``.

    ``settings.plan`` gives everything but the noise multiplier; its ``dp_mode`` must not
    be ``"none"`` (there would be no ε to sweep).

    Raises:
        ValueError: no noise multipliers, one that is not positive, or DP switched off.
    """
    if not noise_multipliers:
        raise ValueError("give at least one noise multiplier to sweep")
    if any(not noise > 0 for noise in noise_multipliers):
        raise ValueError(f"noise multipliers {list(noise_multipliers)} must all be > 0")
    if settings.plan.dp_mode == "none":
        raise ValueError("a privacy sweep needs DP: set dp_mode to 'sample' or 'client'")

    rows = []
    for noise in noise_multipliers:
        run_settings = replace(settings, plan=replace(settings.plan, noise_multiplier=noise))
        summary = await run_federation(run_settings, ServiceUrls(), options)
        rows.append(_row(run_settings, summary))
        log.info("sweep: noise %g -> ε %.3f", noise, rows[-1]["epsilon_max"])
        if out is not None:
            print(_format_row(rows[-1]), file=out, flush=True)

    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, plot_path = out_dir / JSON_NAME, out_dir / PLOT_NAME
    json_path.write_text(json.dumps(_document(settings, options, rows), indent=2) + "\n")
    plot_sweep(rows, plot_path, title=f"{settings.dataset}, {options.clients} clients")
    return SweepResult(rows=rows, json_path=json_path, plot_path=plot_path)


def table_header() -> str:
    """Header line that matches the rows printed by ``run_sweep``."""
    return f"{'noise':>8} {'ε max':>10} {'accuracy':>9} {'seconds':>8}"


def plot_sweep(rows: Sequence[dict[str, Any]], path: Path, *, title: str) -> None:
    """Write a PNG of final test accuracy against the largest ε spent."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    from matplotlib import pyplot as plt

    points = sorted(
        (r["epsilon_max"], r["final_accuracy"], r["noise_multiplier"])
        for r in rows
        if r["final_accuracy"] is not None
    )
    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        for eps, accuracy, noise in points:
            ax.annotate(f"σ={noise:g}", (eps, accuracy), textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel("ε (max over clients)")
        ax.set_ylabel("final test accuracy")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=100)
    finally:
        plt.close(fig)


def _row(settings: CoordinatorSettings, summary: Any) -> dict[str, Any]:
    spent = [p["epsilon_spent"] for p in summary.privacy]
    return {
        "noise_multiplier": settings.plan.noise_multiplier,
        "epsilon_max": max(spent, default=0.0),
        "epsilon_min": min(spent, default=0.0),
        "final_accuracy": summary.final_accuracy,
        "rounds_finalized": sum(r["status"] == "finalized" for r in summary.rounds),
        "seconds": round(summary.seconds, 2),
    }


def _format_row(row: dict[str, Any]) -> str:
    accuracy = row["final_accuracy"]
    shown = f"{accuracy:.4f}" if accuracy is not None else "-"
    return (
        f"{row['noise_multiplier']:>8.3f} {row['epsilon_max']:>10.3f} {shown:>9} "
        f"{row['seconds']:>8.1f}"
    )


def _document(
    settings: CoordinatorSettings, options: FederationOptions, rows: list[dict[str, Any]]
) -> dict[str, Any]:
    plan = settings.plan
    return {
        "dataset": settings.dataset,
        "clients": options.clients,
        "partition": options.partition,
        "rounds": settings.rounds,
        "dp_mode": plan.dp_mode,
        "clip_norm": plan.clip_norm,
        "batch_size": plan.batch_size,
        "local_steps": plan.local_steps,
        "learning_rate": plan.learning_rate,
        "delta": settings.delta,
        "accountant": settings.accountant,
        "rows": rows,
    }
