"""Resilience studies: sweeps of fault campaigns over models, tidy result rows, plots.

The scripts in ``experiments/`` (resilience, bit and layer sensitivity) share
this code: ``subjects`` (models and what counts as their weights and layers),
``sweeps`` (fault settings and their campaigns), ``summary`` (figures with
intervals over trials), ``plots`` and ``report`` (the files a script writes)
and ``flags`` (the scripts' shared absl flags; import it explicitly). Needs
the ``models`` extra; plots need ``plots``, flags need ``experiments``.

A sweep is a list of ``Job``s, one ``jaxfi.Campaign`` each, every one with
its own ``Store`` under ``WORKDIR/campaigns/``: running a sweep again
continues an interrupted campaign where it stopped and reads finished ones
back without computing a trial. A job whose plans sweep rates (``Plan(ber=
(r1, r2, ...))``) has one point per rate, all on one compiled program and
one store. A ``Target`` sizes each point sequentially (more trials until its
top-1 error's interval is narrow enough); each extension resumes the store.
Workdir layout::

    models/NAME.msgpack, NAME.json       trained models (jaxfi.training.train_or_load)
    campaigns/STUDY/SUBJECT/JOB/         one jaxfi Store per campaign

What counts as a weight: every leaf of the ``params`` collection (conv and
dense kernels and biases, BatchNorm scale and bias), i.e. what PyTorch calls
``model.parameters()`` and what the seed study (Rojas et al., CARLA 2019)
corrupted. BatchNorm running statistics (the ``batch_stats`` collection) are
buffers, not weights, and are left out unless asked for (``batch_stats=True``).

Activations are the outputs of the leaf modules (every Conv, Dense and
BatchNorm): the tensors one layer hands to the next, each counted once. The
ReLU and pooling after a layer act on the corrupted value. A bit error rate on
activations applies to every activation bit of every evaluated input.

Statistics. The unit of replication is the trial: one independent fault
scenario, applied to the whole evaluation batch. The inputs of a trial share
its faults, so pooling inputs over trials and giving binomial intervals would
assume an independence that does not hold (intervals far too narrow). Hence:

* per-input figures (top-1 error, SDC over golden-correct inputs, SDC-5, DUE,
  mean logit deviation) are computed per trial, averaged over trials, and get
  an interval over trials (``jaxfi.stats.mean_interval`` with the fault-free
  value as baseline), clipped to the figure's range ([0, 1] for fractions);
  while fewer than ``jaxfi.stats.MIN_CHANGED`` trials moved away from the
  fault-free value, that interval is the changed-share bound, never a
  zero-width one;
* per-trial events (at least one SDC input, at least one DUE input, any
  effect at all) are binomial over trials, with Wilson intervals; they
  depend on how many inputs a trial evaluates (``eval_size``);
* trials with the same index share their key across sweep points, models
  and site kinds (one seed): compare those with ``paired_error`` /
  ``jaxfi.stats.paired_interval``, not with two independent intervals.
"""

from jaxfi.study.plots import plot_bits, plot_layers, plot_sweep, plot_variants
from jaxfi.study.report import timings, versions, write_json, write_report
from jaxfi.study.subjects import (
    DTYPES,
    Subject,
    cast,
    layer_outputs,
    load_subjects,
    weight_leaves,
    weight_selector,
)
from jaxfi.study.summary import EVENTS, MEANS, bit_field, paired_error, per_trial, summary_columns, trial_figures
from jaxfi.study.sweeps import (
    ACTIVATIONS,
    BOTH,
    DEFAULT_COUNTS,
    DEFAULT_RATES,
    SITES,
    WEIGHTS,
    Done,
    Job,
    Point,
    Target,
    half_width,
    logit_deviation,
    plans_for,
    run_sweep,
)

__all__ = [
    "ACTIVATIONS",
    "BOTH",
    "DEFAULT_COUNTS",
    "DEFAULT_RATES",
    "DTYPES",
    "EVENTS",
    "MEANS",
    "SITES",
    "WEIGHTS",
    "Done",
    "Job",
    "Point",
    "Subject",
    "Target",
    "bit_field",
    "cast",
    "half_width",
    "layer_outputs",
    "load_subjects",
    "logit_deviation",
    "paired_error",
    "per_trial",
    "plans_for",
    "plot_bits",
    "plot_layers",
    "plot_sweep",
    "plot_variants",
    "run_sweep",
    "summary_columns",
    "timings",
    "trial_figures",
    "versions",
    "weight_leaves",
    "weight_selector",
    "write_json",
    "write_report",
]
