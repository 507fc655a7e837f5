"""Outcomes of a trial: how the faulty outputs differ from the golden run.

Everything here runs on the host in numpy, one trial per row, so an outcome
depends only on that trial's output bits: not on the executor, chunk size or
device that produced them.

Per trial, over the evaluation batch of B inputs (logits reshaped to [B, C]):

* ``due_inputs``: inputs with any non-finite logit (a detected unrecoverable
  error). Such an input counts as DUE only, never as SDC.
* ``sdc_inputs``: finite inputs whose top-1 class differs from golden's.
* ``sdc_correct_inputs``: the same over inputs golden classified correctly
  (denominator: ``Golden.n_correct``); needs labels.
* ``sdc5_inputs``: finite inputs whose top-1 leaves golden's top-5 (top-C for
  fewer than 5 classes, where it never happens).
* ``sdc``, ``sdc5``, ``due``: the trial has at least one such input.
* ``masked``: no SDC and no DUE on any input. Masking is defined on outcomes,
  not bits: a trial whose logits moved without changing any top-1 is masked.
  ``identical`` says whether the logits are bitwise equal to golden's; the
  golden compared with is the run of the same compiled program with no fault
  landing, so last-bit rounding of another program never counts here.
* ``accuracy``: fraction of inputs classified correctly (DUE inputs count as
  wrong); needs labels.
* ``max_abs_dev``: largest |faulty - golden| over all logits, ``rel_l2``:
  ||faulty - golden||_2 / ||golden||_2, both in float64; +inf when any logit
  is non-finite (the deviation is unbounded), never an error.

Custom outcomes are functions ``fn(golden_output, faulty_output, labels) ->
{name: scalar}`` called once per trial with numpy arrays of the model's output
shape (``labels`` may be None); a boolean value makes a per-trial event, any
other number a float.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

OutcomeFn = Callable[[np.ndarray, np.ndarray, "np.ndarray | None"], Mapping[str, Any]]

TOP_K = 5
EVENTS = ("sdc", "sdc5", "due", "masked")
INPUT_COUNTS = ("sdc_inputs", "sdc5_inputs", "due_inputs")
LABELLED = ("sdc_correct_inputs", "accuracy")
FIGURES = ("max_abs_dev", "rel_l2", "identical")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class Golden:
    """The fault-free run: its output, logits [B, C], top-1, top-5, correctness if labelled."""

    output: np.ndarray
    logits: np.ndarray
    labels: np.ndarray | None
    top1: np.ndarray
    top5: np.ndarray
    correct: np.ndarray | None

    @property
    def batch(self) -> int:
        """Number of inputs in the evaluation batch."""
        return int(self.logits.shape[0])

    @property
    def n_correct(self) -> int | None:
        """Inputs golden classifies correctly (None without labels)."""
        return None if self.correct is None else int(self.correct.sum())

    @property
    def accuracy(self) -> float | None:
        """Golden accuracy (None without labels)."""
        return None if self.correct is None else float(self.correct.mean())


def _as_matrix(logits: Any, what: str) -> np.ndarray:
    arr = np.asarray(logits)
    if arr.ndim == 0:
        raise ValueError(f"{what} must have a leading batch axis, got a scalar")
    return arr.reshape(arr.shape[0], -1)


def golden(logits: Any, labels: Any = None) -> Golden:
    """Golden figures from fault-free logits ([B, ...] -> [B, C]) and optional labels [B]."""
    output = np.asarray(logits)
    matrix = _as_matrix(output, "golden logits")
    bad = ~np.isfinite(matrix.astype(np.float64))
    if bad.any():
        raise ValueError(
            f"the fault-free run gave {int(bad.sum())} non-finite logits (first at input "
            f"{int(np.argwhere(bad)[0][0])}); a campaign needs a finite golden output")
    k = min(TOP_K, matrix.shape[1])
    order = np.argsort(-matrix.astype(np.float64), axis=1, kind="stable")
    top5 = order[:, :k]
    correct = None
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (matrix.shape[0],) or labels.dtype.kind not in "iu":
            raise ValueError(
                f"labels must be integers of shape ({matrix.shape[0]},) (one class per "
                f"input), got {labels.dtype}{list(labels.shape)}")
        _check_classes(labels, matrix.shape[1])
        correct = top5[:, 0] == labels
    return Golden(output, matrix, labels, top5[:, 0], top5, correct)


def _check_classes(labels: np.ndarray, classes: int) -> None:
    bad = (labels < 0) | (labels >= classes)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"labels must be classes in [0, {classes}) for {classes} outputs per "
                         f"input, got {labels[i]} at input {i} ({int(bad.sum())} out of range)")


def builtin_names(labelled: bool) -> tuple[str, ...]:
    """Names of the built-in outcome columns, in table order."""
    return EVENTS + INPUT_COUNTS + (LABELLED if labelled else ()) + FIGURES


def classification(g: Golden, outputs: np.ndarray) -> dict[str, np.ndarray]:
    """Built-in outcomes of T trials whose outputs are [T, B, ...]."""
    return reduce_inputs(per_input(g, outputs), g.correct is not None)


def per_input(g: Golden, outputs: np.ndarray) -> dict[str, np.ndarray]:
    """Per trial and input ([T, B] arrays): what ``reduce_inputs`` needs.

    Inputs are independent here, so the figures of a batch split into
    microbatches, concatenated along the input axis, reduce to the same
    outcomes as the whole batch's. Only the inputs whose logits differ from
    golden's in any bit are examined; the others have golden's figures.
    """
    if outputs.shape[1:] != g.output.shape:
        raise ValueError(f"trial outputs have shape {list(outputs.shape[1:])}, golden "
                         f"{list(g.output.shape)}")
    t = outputs.shape[0]
    faulty = np.ascontiguousarray(outputs).reshape(t, *g.logits.shape)
    uint = np.dtype(f"u{faulty.dtype.itemsize}")
    same = (faulty.view(uint) == np.ascontiguousarray(g.logits).view(uint)[None]).all(axis=2)
    trial, where = np.nonzero(~same)
    figures = _differing(g, faulty[trial, where], where)
    golden_square = (g.logits.astype(np.float64) ** 2).sum(axis=1)
    out = {"finite": np.ones((t, g.batch), bool), "changed": np.zeros((t, g.batch), bool),
           "left5": np.zeros((t, g.batch), bool), "max_abs": np.zeros((t, g.batch)),
           "square": np.zeros((t, g.batch)), "golden_square": np.broadcast_to(golden_square, (t, g.batch)),
           "unbounded": np.zeros((t, g.batch), bool), "same": same}
    if g.correct is not None:
        out["changed_correct"] = np.zeros((t, g.batch), bool)
        out["right"] = np.broadcast_to(g.correct, (t, g.batch)).copy()
    for name, values in figures.items():
        out[name][trial, where] = values
    return out


def _differing(g: Golden, rows: np.ndarray, inputs: np.ndarray) -> dict[str, np.ndarray]:
    """``per_input``'s figures of faulty logit ``rows`` [M, C] of golden's ``inputs`` [M]."""
    with np.errstate(invalid="ignore"):  # NaN logits are expected here: they make a DUE
        wide = rows.astype(np.float64)
    finite = np.isfinite(wide).all(axis=1)
    top1 = np.argmax(np.where(np.isfinite(wide), wide, -np.inf), axis=1)
    changed = finite & (top1 != g.top1[inputs])
    out = {"finite": finite, "changed": changed,
           "left5": finite & ~(top1[:, None] == g.top5[inputs]).any(axis=1)}
    if g.correct is not None:
        out["changed_correct"] = changed & g.correct[inputs]
        out["right"] = finite & (top1 == g.labels[inputs])
    with np.errstate(invalid="ignore", over="ignore"):
        diff = wide - g.logits[inputs].astype(np.float64)
        out["unbounded"] = ~np.isfinite(diff).all(axis=1)
        diff = np.where(np.isfinite(diff), diff, 0.0)
    out["max_abs"] = np.abs(diff).max(axis=1, initial=0.0)
    out["square"] = (diff * diff).sum(axis=1)
    return out


def reduce_inputs(per: Mapping[str, np.ndarray], labelled: bool) -> dict[str, np.ndarray]:
    """Built-in outcome columns from ``per_input`` figures over a trial's inputs."""
    out = {
        "sdc_inputs": per["changed"].sum(axis=1),
        "sdc5_inputs": per["left5"].sum(axis=1),
        "due_inputs": (~per["finite"]).sum(axis=1),
    }
    out["sdc"], out["sdc5"], out["due"] = (out[n] > 0 for n in INPUT_COUNTS)
    out["masked"] = ~(out["sdc"] | out["due"])
    if labelled:
        out["sdc_correct_inputs"] = per["changed_correct"].sum(axis=1)
        out["accuracy"] = per["right"].mean(axis=1)
    bad = per["unbounded"].any(axis=1)
    base = np.sqrt(per["golden_square"].sum(axis=1))
    norm = np.sqrt(per["square"].sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.where(base > 0, norm / np.where(base > 0, base, 1.0), np.where(norm > 0, np.inf, 0.0))
    out["max_abs_dev"] = np.where(bad, np.inf, per["max_abs"].max(axis=1, initial=0.0))
    out["rel_l2"] = np.where(bad, np.inf, rel)
    out["identical"] = per["same"].all(axis=1)
    return {name: np.asarray(out[name]) for name in builtin_names(labelled)}


def custom_names(fns: Sequence[OutcomeFn], g: Golden, taken: Sequence[str]) -> dict[str, np.dtype]:
    """Column names and dtypes of custom outcomes, found by calling each on golden vs golden."""
    columns: dict[str, np.dtype] = {}
    for fn in fns:
        if not callable(fn):
            raise TypeError(f"outcome functions must be callable, got {fn!r}")
        for name, value in _call(fn, g, g.output).items():
            if not isinstance(name, str) or not _NAME.match(name):
                raise ValueError(f"outcome name {name!r} from {_fn_name(fn)} must be a "
                                 "letter followed by letters, digits or '_'")
            if name in columns or name in taken:
                raise ValueError(f"outcome name {name!r} from {_fn_name(fn)} is already used; "
                                 f"taken: {sorted(set(taken) | set(columns))}")
            columns[name] = np.dtype(bool) if isinstance(value, (bool, np.bool_)) else np.dtype(np.float64)
    return columns


def custom(fns: Sequence[OutcomeFn], columns: Mapping[str, np.dtype], g: Golden,
           outputs: np.ndarray) -> dict[str, np.ndarray]:
    """Custom outcomes of T trials whose outputs are [T, B, ...], one call per trial."""
    out = {name: np.zeros(outputs.shape[0], dtype) for name, dtype in columns.items()}
    for t in range(outputs.shape[0]):
        for fn in fns:
            for name, value in _call(fn, g, outputs[t]).items():
                if name not in out:
                    raise ValueError(f"{_fn_name(fn)} returned a new outcome {name!r}; it "
                                     f"must always return {sorted(columns)}")
                out[name][t] = value
    return out


def _call(fn: OutcomeFn, g: Golden, faulty: np.ndarray) -> dict[str, Any]:
    result = fn(g.output, faulty, g.labels)
    if not isinstance(result, Mapping):
        raise TypeError(f"outcome function {_fn_name(fn)} must return a dict of scalars, "
                        f"got {type(result).__name__}")
    values = {}
    for name, value in result.items():
        arr = np.asarray(value)
        if arr.shape != () or arr.dtype.kind not in "biuf":
            raise TypeError(f"outcome {name!r} of {_fn_name(fn)} must be a real scalar, got "
                            f"{arr.dtype}{list(arr.shape)}")
        values[name] = arr.item()
    return values


def _fn_name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def sequence_outcomes(targets: Any) -> OutcomeFn:
    """Outcomes for sequence models whose output is logits ``[B, L, V]``, scored against ``targets`` ``[B, L]``.

    The greedy token at each position is its argmax (a non-finite logit makes
    the position's token count as changed). Per trial:

    * ``token_sdc``: some greedy token differs from golden's;
      ``token_sdc_rate``: the fraction of tokens that do;
    * ``exact_match_lost``: some sequence golden got exactly right (every
      token equal to ``targets``) no longer is; ``exact_match``: the
      fraction of sequences exactly right;
    * ``delta_ce``: mean token cross-entropy against ``targets`` minus
      golden's, in float64 (+inf if a logit is non-finite).

    Args:
      targets: integer tokens ``[B, L]``.

    Returns:
      An outcome function for ``Campaign(..., outcomes=[...])``.

    Raises:
      ValueError: ``targets`` is not an integer array of rank 2.
    """
    targets = np.asarray(targets)
    if targets.ndim != 2 or targets.dtype.kind not in "iu":
        raise ValueError(f"targets must be integer tokens [batch, length], got "
                         f"{targets.dtype}{list(targets.shape)}")

    def outcomes(golden_output: np.ndarray, faulty: np.ndarray, labels: Any) -> dict[str, Any]:
        if faulty.shape[:2] != targets.shape:
            raise ValueError(f"sequence_outcomes: output {list(faulty.shape)} does not start with "
                             f"the targets' shape {list(targets.shape)}")
        gold, bad = golden_output.astype(np.float64), faulty.astype(np.float64)
        finite = np.isfinite(bad).all(axis=-1)
        changed = ~finite | (np.argmax(bad, axis=-1) != np.argmax(gold, axis=-1))
        golden_exact = (np.argmax(gold, axis=-1) == targets).all(axis=1)
        exact = finite.all(axis=1) & (np.argmax(bad, axis=-1) == targets).all(axis=1)
        delta = _cross_entropy(bad, targets) - _cross_entropy(gold, targets) if finite.all() else np.inf
        return {"token_sdc": bool(changed.any()), "token_sdc_rate": float(changed.mean()),
                "exact_match_lost": bool((golden_exact & ~exact).any()),
                "exact_match": float(exact.mean()), "delta_ce": float(delta)}

    return outcomes


def _cross_entropy(logits: np.ndarray, targets: np.ndarray) -> float:
    """Mean token cross-entropy of float64 ``logits`` [B, L, V] against ``targets`` [B, L]."""
    top = logits.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(axis=-1)) + top[..., 0]
    picked = np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return float((log_z - picked).mean())
