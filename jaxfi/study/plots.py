"""Figures of the study scripts, written as PNG files.

matplotlib (the ``plots`` extra) is imported when a figure is drawn, and
figures are drawn on a ``matplotlib.figure.Figure`` rendered by Agg: nothing
here chooses a global backend or touches pyplot's state.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np
import pandas as pd

import jaxfi
from jaxfi._src.extras import require


def _figure(**options: Any) -> Any:
    """A new ``matplotlib.figure.Figure`` rendered by Agg."""
    figure = require("matplotlib.figure", "plots")
    agg = require("matplotlib.backends.backend_agg", "plots")
    fig = figure.Figure(**options)
    agg.FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | pathlib.Path, dpi: int = 130) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)


def plot_sweep(table: pd.DataFrame, path: str | pathlib.Path, title: str) -> None:
    """Error, SDC and DUE against the fault rate (or count), one curve and band per model.

    Args:
      table: rows of ``jaxfi.study.trial_figures`` with ``model`` and ``rate``
        (or ``count``) columns.
      path: the PNG file to write.
      title: the figure's title.
    """
    x, xlabel = _sweep_axis(table)
    fig = _figure(figsize=(12, 4.6))
    left, right = fig.subplots(1, 2)
    for i, (model, rows) in enumerate(table.groupby("model", sort=False)):
        color = f"C{i}"
        rows = rows.sort_values(x)
        left.plot(rows[x], 100 * rows["error"], "o-", color=color,
                  label=f"{model} (fault-free {100 * rows['golden_error'].iloc[0]:.1f}%)")
        left.fill_between(rows[x], 100 * rows["error_lo"], 100 * rows["error_hi"], color=color, alpha=0.2)
        left.axhline(100 * rows["golden_error"].iloc[0], color=color, lw=0.8, ls=":")
        for name, style in (("sdc", "o-"), ("due", "s--")):
            right.plot(rows[x], 100 * rows[name], style, color=color, label=f"{model} {name.upper()}")
            right.fill_between(rows[x], 100 * rows[f"{name}_lo"], 100 * rows[f"{name}_hi"],
                               color=color, alpha=0.15)
    left.set_ylabel("top-1 error of the faulty model (%)")
    left.set_title("Top-1 error (dotted: fault-free)")
    right.set_ylabel("inputs affected (%)")
    right.set_title("SDC (of golden-correct inputs) and DUE (non-finite output)")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title + "\nbands: 95% intervals over trials (jaxfi.stats.mean_interval)", fontsize=10)
    _save(fig, path)


def _sweep_axis(table: pd.DataFrame) -> tuple[str, str]:
    if table["rate"].notna().all():
        return "rate", "bit error rate (probability that each bit flips)"
    return "count", "single-bit flips per trial (exact count)"


def plot_bits(table: pd.DataFrame, path: str | pathlib.Path, title: str) -> None:
    """Heat maps of SDC and DUE per trial by bit position: a row per model, a panel row per dtype.

    Args:
      table: rows with ``model``, ``dtype``, ``bit``, ``sdc_trial`` and ``due_trial``.
      path: the PNG file to write.
      title: the figure's title.
    """
    colors = require("matplotlib.colors", "plots")
    dtypes = list(dict.fromkeys(table["dtype"]))
    models = list(dict.fromkeys(table["model"]))
    height = 0.8 + len(dtypes) * (1.3 + 0.35 * len(models))
    fig = _figure(figsize=(14, height))
    axes = fig.subplots(len(dtypes), 2, squeeze=False)
    norm = colors.PowerNorm(0.5, vmin=0.0, vmax=1.0)
    for row, dtype in enumerate(dtypes):
        width = jaxfi.format_of(dtype).width
        for col, (name, label) in enumerate((("sdc_trial", "SDC"), ("due_trial", "DUE"))):
            ax = axes[row, col]
            grid = np.full((len(models), width), np.nan)
            for _, r in table[table["dtype"] == dtype].iterrows():
                grid[models.index(r["model"]), int(r["bit"])] = r[name]
            image = ax.imshow(grid[:, ::-1], aspect="auto", cmap="magma_r", norm=norm,
                              extent=(width - 0.5, -0.5, len(models) - 0.5, -0.5))
            _mark_fields(ax, dtype)
            ax.set_yticks(range(len(models)), models)
            ax.set_xlabel(f"bit position in {dtype} (0 = least significant; "
                          "blue lines: sign | exponent | mantissa)", fontsize=8)
            ax.set_title(f"{dtype}: P({label}) per single-bit flip", fontsize=9)
            fig.colorbar(image, ax=ax, label=f"P({label}) per trial")
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def _mark_fields(ax: Any, dtype: str) -> None:
    """Lines around the exponent field and a tick per bit."""
    fmt = jaxfi.format_of(dtype)
    for edge in (min(fmt.exponent) - 0.5, max(fmt.exponent) + 0.5):
        ax.axvline(edge, color="tab:blue", lw=1.2)
    ax.set_xticks(range(fmt.width), [str(b) for b in range(fmt.width)], fontsize=6)


def plot_layers(table: pd.DataFrame, path: str | pathlib.Path, title: str) -> None:
    """Per model: SDC per single-bit flip in each layer leaf, raw and weighted by its share of bits.

    Args:
      table: rows with ``model``, ``leaf``, ``sdc_trial`` and ``sdc_weighted`` with their bounds.
      path: the PNG file to write.
      title: the figure's title.
    """
    models = list(dict.fromkeys(table["model"]))
    sizes = [max(2, (table["model"] == m).sum()) for m in models]
    fig = _figure(figsize=(12, 1.2 + 0.26 * sum(sizes)))
    axes = fig.subplots(len(models), 2, squeeze=False, gridspec_kw={"height_ratios": sizes})
    for row, model in enumerate(models):
        rows = table[table["model"] == model]
        y = np.arange(len(rows))
        names = [n.removeprefix("params/") for n in rows["leaf"]]
        for col, (value, lo, hi, xlabel) in enumerate((
                ("sdc_trial", "sdc_trial_lo", "sdc_trial_hi", "P(SDC) per single-bit flip in the leaf"),
                ("sdc_weighted", "sdc_weighted_lo", "sdc_weighted_hi",
                 "P(SDC) x leaf's share of weight bits (sums to the model's)"))):
            ax = axes[row, col]
            err = np.vstack([rows[value] - rows[lo], rows[hi] - rows[value]])
            ax.barh(y, rows[value], xerr=err, color=f"C{row}", alpha=0.8, capsize=2)
            ax.set_yticks(y, names, fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel(xlabel, fontsize=8)
            ax.grid(True, axis="x", alpha=0.3)
            ax.set_title(f"{model}", fontsize=9)
    fig.suptitle(title + "\nerror bars: 95% Wilson intervals over trials", fontsize=10)
    _save(fig, path)


def plot_variants(table: pd.DataFrame, path: str | pathlib.Path, title: str) -> None:
    """Error against the bit error rate, one line and band per variant (fault-aware training).

    Args:
      table: rows with ``variant``, ``rate``, ``error``, ``lo``, ``hi`` and ``golden_error``.
      path: the PNG file to write.
      title: the figure's title.
    """
    fig = _figure(figsize=(7.5, 4.8))
    ax = fig.subplots()
    for variant, rows in table.groupby("variant", sort=False):
        clean = 100 * rows["golden_error"].iloc[0]
        line, = ax.plot(rows["rate"], 100 * rows["error"], marker="o",
                        label=f"{variant} (fault-free {clean:.1f}%)")
        ax.fill_between(rows["rate"], 100 * rows["lo"], 100 * rows["hi"],
                        color=line.get_color(), alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel("bit error rate over all weights (flipped bits per bit)")
    ax.set_ylabel("top-1 error under faults (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path, dpi=120)
