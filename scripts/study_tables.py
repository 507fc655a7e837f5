"""Renders the main job's tables and figure from its committed CSVs into the README and docs/study.md.

    python scripts/study_tables.py [--write]

Reads docs/study_resilience.csv and docs/study_resilience_paired.csv (copies
of what ``experiments/resilience.py --workdir=runs/study`` writes as
resilience-weights-rate{,-paired}.csv) and prints the README's short table
and the study page's full and paired tables; with --write it replaces the
text between the ``<!-- study-table:begin -->`` / ``<!-- study-table:end -->``
markers of README.md and the ``<!-- study-full:begin/end -->`` and
``<!-- study-paired:begin/end -->`` markers of docs/study.md, and redraws
docs/study_error_vs_rate.png from the CSV (``jaxfi.study.plot_sweep``, the
resilience script's default title).
"""

from __future__ import annotations

import argparse
import pathlib
import re

import pandas as pd

from jaxfi import study

REPO = pathlib.Path(__file__).resolve().parent.parent


TITLE = ("Random weight bit flips on mnist5k: 32-2048 trials (until the error's 95% interval is +-2 points) "
         "x 128 test images per point")


def _pct(value: float, digits: int = 1) -> str:
    return f"{100 * value:.{digits}f}"


def _flips(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _interval(row: pd.Series, name: str) -> str:
    return f"{_pct(row[name])} [{_pct(row[f'{name}_lo'])}, {_pct(row[f'{name}_hi'])}]"


def short_table(table: pd.DataFrame) -> str:
    """Rates down, models across: trials and top-1 error with its interval."""
    models = list(dict.fromkeys(table["model"]))
    lines = ["| BER | " + " | ".join(models) + " |", "| --- |" + " --- |" * len(models)]
    for rate, rows in table.groupby("rate", sort=True):
        cells = [f"{int(r['trials'])}: {_interval(r, 'error')}" for _, r in rows.set_index("model").loc[models]
                 .reset_index().iterrows()]
        lines.append(f"| {rate:.0e} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def full_table(table: pd.DataFrame) -> str:
    """One row per (model, rate) with every figure of the study page."""
    lines = ["| model | BER | trials | flips per inference | top-1 error % [95% CI] | SDC % [CI] | SDC-5 % "
             "| DUE % [CI] | P(trial has SDC) [CI] | P(trial has DUE) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in table.iterrows():
        lines.append(
            f"| {r['model']} | {r['rate']:.0e} | {int(r['trials']):,} | {_flips(r['faults_mean'])} | "
            f"{_interval(r, 'error')} | {_interval(r, 'sdc')} | {_pct(r['sdc5'])} | {_interval(r, 'due')} | "
            f"{r['sdc_trial']:.2f} [{r['sdc_trial_lo']:.2f}, {r['sdc_trial_hi']:.2f}] | {r['due_trial']:.2f} |")
    return "\n".join(lines)


def paired_table(paired: pd.DataFrame) -> str:
    """Paired error differences in points, with their intervals and the trials they share."""
    lines = ["| BER | a | b | trials | a - b, points [95% paired CI] | pairs that moved |",
             "|---|---|---|---|---|---|"]
    for _, r in paired.iterrows():
        lines.append(f"| {r['rate']:.0e} | {r['a']} | {r['b']} | {int(r['trials']):,} | "
                     f"{100 * r['diff']:+.1f} [{100 * r['diff_lo']:+.1f}, {100 * r['diff_hi']:+.1f}] | "
                     f"{int(r['changed'])} |")
    return "\n".join(lines)


def _replace(path: pathlib.Path, marker: str, body: str) -> None:
    text = path.read_text()
    pattern = re.compile(rf"(<!-- {marker}:begin -->\n).*?(\n<!-- {marker}:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path}: no <!-- {marker}:begin/end --> markers")
    path.write_text(pattern.sub(lambda m: m.group(1) + body + m.group(2), text))


def main() -> None:
    """Prints the tables, or writes them between their markers with --write."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    table = pd.read_csv(REPO / "docs" / "study_resilience.csv")
    paired = pd.read_csv(REPO / "docs" / "study_resilience_paired.csv")
    parts = {"study-table": short_table(table), "study-full": full_table(table),
             "study-paired": paired_table(paired)}
    if not args.write:
        print("\n\n".join(parts.values()))
        return
    _replace(REPO / "README.md", "study-table", parts["study-table"])
    _replace(REPO / "docs" / "study.md", "study-full", parts["study-full"])
    _replace(REPO / "docs" / "study.md", "study-paired", parts["study-paired"])
    study.plot_sweep(table, REPO / "docs" / "study_error_vs_rate.png", TITLE)


if __name__ == "__main__":
    main()
