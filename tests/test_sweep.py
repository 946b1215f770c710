"""The ``fedq privacy sweep`` command: one federation per noise multiplier, JSON and plot."""

from __future__ import annotations

import json

from fedq.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_privacy_sweep_writes_one_row_per_noise_level_and_a_png_plot(data_root, tmp_path, capsys):
    out = tmp_path / "sweep"

    status = main(
        [
            "--log-level",
            "WARNING",
            "privacy",
            "sweep",
            "--dataset",
            "mnist",
            "--data-dir",
            str(data_root),
            "--clients",
            "2",
            "--rounds",
            "1",
            "--noise",
            "0.8",
            "2.0",
            "--local-steps",
            "5",
            "--batch-size",
            "32",
            "--learning-rate",
            "0.5",
            "--out",
            str(out),
        ]
    )

    assert status == 0
    document = json.loads((out / "privacy_sweep.json").read_text())
    rows = document["rows"]
    assert [r["noise_multiplier"] for r in rows] == [0.8, 2.0]
    assert all(r["rounds_finalized"] == 1 for r in rows)
    assert all(0.0 <= r["final_accuracy"] <= 1.0 for r in rows)
    assert rows[0]["epsilon_max"] > rows[1]["epsilon_max"] > 0  # more noise, less ε
    assert document["clients"] == 2 and document["local_steps"] == 5

    assert (out / "privacy_sweep.png").read_bytes()[:8] == PNG_SIGNATURE
    printed = capsys.readouterr().out
    assert "0.800" in printed and "2.000" in printed


def test_privacy_table_still_prints_epsilon_per_noise_multiplier(capsys):
    status = main(["privacy", "table", "--noise", "1.0", "2.0", "--rounds", "2"])

    assert status == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[1].split()[0] == "1.000"
