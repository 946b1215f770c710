"""The closing table of a federation run."""

from __future__ import annotations

from typing import Any, TextIO

__all__ = ["print_summary"]


def print_summary(summary: Any, *, settings: Any, out: TextIO) -> None:
    """Print rounds (accuracy, loss, updates, time) and the privacy spent."""
    print(
        "\nround  status      participants  aggregated  examples  accuracy   loss    seconds",
        file=out,
    )
    for r in summary.rounds:
        accuracy = f"{r['test_accuracy']:.4f}" if r["test_accuracy"] is not None else "   -  "
        loss = f"{r['test_loss']:.4f}" if r["test_loss"] is not None else "   -  "
        seconds = (r["closed_at"] or r["opened_at"]) - r["opened_at"]
        print(
            f"{r['round']:>5}  {r['status']:<10}  {len(r['participants']):>12}  "
            f"{r['updates_aggregated']:>10}  {r['examples']:>8}  {accuracy:>8}  {loss:>7}  "
            f"{seconds:>7.1f}",
            file=out,
        )

    plan = settings.plan
    if plan.dp_mode == "none":
        print("\nprivacy: DP off (dp_mode none): updates are not differentially private", file=out)
    else:
        spent = [p["epsilon_spent"] for p in summary.privacy]
        print(
            f"\nprivacy: {plan.dp_mode}-level DP, noise multiplier {plan.noise_multiplier}, "
            f"clip norm {plan.clip_norm}, δ={settings.delta:g}; ε per client "
            f"max {max(spent, default=0):.3f}, min {min(spent, default=0):.3f} "
            f"(budget {settings.epsilon_budget:g})",
            file=out,
        )
    final = summary.final_accuracy
    print(
        f"final test accuracy: {final:.4f}" if final is not None else "no model evaluated",
        f"in {summary.seconds:.1f}s",
        file=out,
    )
