"""Campaign throughput against the peers' per-trial loop, measured side by side.

For each model and fault case it prints, from one run on this machine:

* the golden forward rate (batches/s);
* trials/s of the per-trial Python loop over a jitted faulty forward (how
  PyTorchFI and the other peers run), and of the "grouped", "map" and "vmap"
  executors, each through ``Campaign.run`` (outcomes included), steady state:
  the same trials run again, programs already compiled; the loop and
  grouped take turns ``--rounds`` times and give their median rate;
* compile seconds (``Result.compile_seconds``);
* what "auto" picks and the wall time of a whole ``--campaign``-trial
  campaign in a fresh process (from ``Campaign(...)`` to its Result,
  compilation included) with ``executor="auto"`` and with "grouped" (the
  least of ``--fresh_repeats`` turns each), with "grouped" again in a fresh
  process whose compilation cache an earlier one filled
  (``jaxfi.executors.cache_compilation``: a resumed or repeated campaign),
  next to the loop's time for the same campaign estimated from its compile
  and steady rate;
* ``downstream_work``: the expected share of the forward's multiply-adds
  after a trial's first faulted layer (``jaxfi.executors.downstream_work``),
  and ``mac_bound`` = 1 / that: what skipping the golden prefix can save
  against one forward per trial, by multiply-adds (row slicing, unchanged
  features and the loop's own overheads move the real ratio either way);
* verdict agreement of the fast path with the reference (the loop), per
  stratum: the share of trials whose SDC, SDC-5, DUE and masked verdicts all
  agree, and the disagreeing trials. Stratum "uniform" is the case's own
  trials; stratum "nonfinite" (``--nonfinite`` trials, 0: skip) hits the
  case's sites with one fault that sets every exponent bit of a value
  (``StuckAt(1, bits="exponent")``: the value becomes a NaN, or an infinity
  if its mantissa is 0, as a top-exponent flip of a value in [1, 2) does),
  where compiled programs stop agreeing (see docs/nonfinite.md). Per
  stratum, map and vmap are compared as well where they are offered, and
  the row gives the reference's DUE and masked shares and the share of
  grouped trials the reference program recomputed.

Models: the 108k-parameter CNN, LeNet-5 and ResNet-8 trained on MNIST-5k
(cached in --workdir), batch 256; "jaxcnn", the same CNN written in plain
jax (lax convolutions and max-pool windows) on the CNN's trained weights;
ResNet-18 at 224x224x3 with random weights and random images, batch 16.
Cases: one single-bit flip in any weight (the ``params`` collection), one in
any activation, and a bit error rate of 1e-6 over weights.

    python benchmarks/throughput.py [--models cnn,lenet5] [--cases weights,ber]
    python benchmarks/throughput.py --agreement_only --cases activations --trials 1024 --nonfinite 512
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxfi
from jaxfi import data, models, training

CASES = {
    "weights": ("one bit flip in any weight", lambda: jaxfi.Plan(jaxfi.Params("^params/"), jaxfi.BitFlip(), count=1)),
    "activations": ("one bit flip in any activation",
                    lambda: jaxfi.Plan(jaxfi.Activations(), jaxfi.BitFlip(), count=1)),
    "ber": ("bit error rate 1e-6 over weights",
            lambda: jaxfi.Plan(jaxfi.Params("^params/"), jaxfi.BitFlip(), ber=1e-6)),
}
# One fault per trial that makes a value of the case's sites non-finite.
NONFINITE = jaxfi.StuckAt(1, bits="exponent")
VERDICTS = ("sdc", "sdc5", "due", "masked")
# Per model: batch, trials for the loop (and the agreement check), trials for the fast path.
SIZES = {"cnn": (256, 1024, 4096), "jaxcnn": (256, 1024, 4096), "lenet5": (256, 1024, 4096),
         "resnet8": (256, 256, 1024), "resnet18": (16, 16, 64)}


def plain_cnn(params: Any, x: jax.Array) -> jax.Array:
    """The zoo's CNN in plain jax, on its variables: conv16, bias, ReLU, 2x2
    max-pool, conv32, bias, ReLU, max-pool, dense 128 with ReLU, dense 10."""
    p = params["params"]

    def conv_block(h: jax.Array, layer: dict[str, Any]) -> jax.Array:
        h = lax.conv_general_dilated(h, layer["kernel"], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        h = jax.nn.relu(h + layer["bias"])
        return lax.reduce_window(h, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")

    h = conv_block(conv_block(x, p["conv1"]), p["conv2"]).reshape(x.shape[0], -1)
    h = jax.nn.relu(h @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    return h @ p["fc2"]["kernel"] + p["fc2"]["bias"]


def subject(name: str, workdir: str) -> tuple[Any, Any, np.ndarray, np.ndarray | None]:
    """``(apply_fn, params, images, labels)`` of a benchmark model."""
    if name == "resnet18":
        model = models.get_model("resnet18")
        apply_fn, params = models.bind_inference(model, models.init_variables(model, (224, 224, 3)))
        images = np.asarray(jax.random.normal(jax.random.key(1), (SIZES[name][0], 224, 224, 3)))
        return apply_fn, params, images, None
    model, variables, _ = training.train_or_load("cnn" if name == "jaxcnn" else name, workdir, log=None)
    apply_fn, params = models.bind_inference(model, variables)
    test = data.eval_subset(data.load("mnist5k", "test"), SIZES[name][0])
    return plain_cnn if name == "jaxcnn" else apply_fn, params, test.images, test.labels


def golden_rate(apply_fn, params, images, repeats: int = 5) -> float:
    forward = jax.jit(apply_fn)
    jax.block_until_ready(forward(params, images))
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        jax.block_until_ready(forward(params, images))
        times.append(time.perf_counter() - began)
    return 1.0 / statistics.median(times)


def timed_run(campaign: jaxfi.Campaign, trials: int, executor: str, chunk: int) -> tuple[Any, float, float]:
    """The result, compile seconds and steady trials/s of ``executor`` on ``trials`` trials."""
    result = campaign.run(trials, executor=executor, chunk_size=chunk, quiet=True)
    return result, result.compile_seconds, steady_rate(campaign, trials, executor, chunk)


def steady_rate(campaign: jaxfi.Campaign, trials: int, executor: str, chunk: int) -> float:
    """Trials/s of ``executor`` on ``trials`` trials, programs already compiled."""
    began = time.perf_counter()
    campaign.run(trials, executor=executor, chunk_size=chunk, quiet=True)
    return trials / (time.perf_counter() - began)


def interleaved(campaign: jaxfi.Campaign, runs: dict[str, tuple[int, str, int]], rounds: int) -> dict[str, float]:
    """Median steady trials/s of each run (name -> trials, executor, chunk), the
    runs taking turns ``rounds`` times so that a change in the machine's load
    falls on all of them alike."""
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, (trials, executor, chunk) in runs.items():
            rates[name].append(steady_rate(campaign, trials, executor, chunk))
    return {name: statistics.median(r) for name, r in rates.items()}


def agreement(fast: Any, reference: Any) -> tuple[float, list[int]]:
    """Share of the reference's trials whose verdicts all agree, and the others."""
    n = len(reference.table)
    a, b = fast.table.iloc[:n], reference.table
    same = np.ones(n, bool)
    for verdict in VERDICTS:
        same &= a[verdict].to_numpy() == b[verdict].to_numpy()
    return float(same.mean()), [int(t) for t in b["trial"][~same]]


def stratum_plan(case: str, stratum: str) -> jaxfi.Plan:
    """The plan of a stratum of a case: the case's own ("uniform") or one
    ``NONFINITE`` fault in the case's sites ("nonfinite")."""
    plan = CASES[case][1]()
    return plan if stratum == "uniform" else dataclasses.replace(plan, fault=NONFINITE, count=1, ber=None)


def stratum_agreement(subject_: tuple[Any, ...], case: str, stratum: str, trials: int,
                      others: list[str]) -> dict[str, Any]:
    """Verdict agreement with the loop on ``trials`` trials of a stratum:
    grouped's (and the disagreeing trials), then each of ``others`` where
    it is offered; the loop's DUE and masked shares; the share of grouped
    trials the reference program recomputed (docs/nonfinite.md)."""
    campaign = jaxfi.Campaign(*subject_, stratum_plan(case, stratum), seed=0)
    reference = campaign.run(trials, executor="loop", chunk_size=64, quiet=True)
    fast = campaign.run(trials, executor="grouped", chunk_size=256, quiet=True)
    on_reference = fast.table["program"].to_numpy() == reference.table["program"].to_numpy()
    row = {f"{stratum}_trials": trials, f"{stratum}_loop_due": float(reference.table["due"].mean()),
           f"{stratum}_loop_masked": float(reference.table["masked"].mean()),
           f"{stratum}_grouped_recomputed": float(on_reference.mean())}
    row[f"agreement_{stratum}"], row[f"disagreeing_{stratum}"] = agreement(fast, reference)
    for executor in others:
        try:
            other = campaign.run(trials, executor=executor, chunk_size=64, quiet=True)
            row[f"agreement_{stratum}_{executor}"] = agreement(other, reference)[0]
        except jaxfi.executors.NotBitwiseError:
            row[f"agreement_{stratum}_{executor}"] = "not offered (not bitwise)"
    return row


def agreement_only(name: str, case: str, args: argparse.Namespace) -> dict[str, Any]:
    """Verdict agreement alone, per stratum: ``--trials`` uniform trials and
    ``--nonfinite`` NaN/Inf trials, grouped, map and vmap against the loop."""
    subject_ = subject(name, args.workdir)
    row: dict[str, Any] = {"model": name, "case": CASES[case][0]}
    others = [] if name == "resnet18" else ["map", "vmap"]
    for stratum, trials in (("uniform", args.trials), ("nonfinite", args.nonfinite)):
        if trials and (stratum == "uniform" or case != "ber"):
            row.update(stratum_agreement(subject_, case, stratum, trials, others))
    return row


def fresh_campaign(name: str, case: str, trials: int, workdir: str, executor: str, cache: str = "") -> dict[str, Any]:
    """A whole campaign in a fresh process (Campaign construction and compilation
    included), with JAX's persistent compilation cache in ``cache`` if given."""
    done = subprocess.run([sys.executable, __file__, "--fresh", name, case, str(trials), workdir, executor, cache],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def fresh_campaigns(name: str, case: str, args: argparse.Namespace) -> dict[str, Any]:
    """Fresh-process campaigns: auto and grouped taking turns ``--fresh_repeats``
    times (the least wall time of each), then grouped again with a compilation
    cache that one earlier process filled (a resumed or repeated campaign)."""
    runs: dict[str, list[dict[str, Any]]] = {"auto": [], "grouped": []}
    for _ in range(args.fresh_repeats):
        for executor, done in runs.items():
            done.append(fresh_campaign(name, case, args.campaign, args.workdir, executor))
    with tempfile.TemporaryDirectory() as cache:
        fresh_campaign(name, case, args.campaign, args.workdir, "grouped", cache)
        cached = fresh_campaign(name, case, args.campaign, args.workdir, "grouped", cache)
    return {"auto_picked": runs["auto"][0]["executor"],
            "campaign_auto_s": min(r["seconds"] for r in runs["auto"]),
            "campaign_grouped_s": min(r["seconds"] for r in runs["grouped"]),
            "campaign_grouped_cached_s": cached["seconds"]}


def _fresh(name: str, case: str, trials: int, workdir: str, executor: str, cache: str) -> None:
    if cache:
        jaxfi.executors.cache_compilation(cache)
    apply_fn, params, images, labels = subject(name, workdir)
    began = time.perf_counter()
    campaign = jaxfi.Campaign(apply_fn, params, images, labels, CASES[case][1](), seed=0)
    result = campaign.run(trials, executor=executor, chunk_size=256, quiet=True)
    seconds = time.perf_counter() - began
    print(json.dumps({"seconds": seconds, "executor": result.executor, "trials": len(result.table)}))


def bench(name: str, case: str, args: argparse.Namespace) -> dict[str, Any]:
    apply_fn, params, images, labels = subject(name, args.workdir)
    batch, n_loop, n_fast = SIZES[name]
    n_loop, n_fast = min(n_loop, args.trials), min(n_fast, args.trials * 4)
    row: dict[str, Any] = {"model": name, "case": CASES[case][0], "batch": batch,
                           "golden_batches_per_s": golden_rate(apply_fn, params, images)}
    campaign = jaxfi.Campaign(apply_fn, params, images, labels, CASES[case][1](), seed=0)
    reference = campaign.run(n_loop, executor="loop", chunk_size=64, quiet=True)
    fast = campaign.run(n_fast, executor="grouped", chunk_size=256, quiet=True)
    row["loop_compile_s"], row["grouped_compile_s"] = reference.compile_seconds, fast.compile_seconds
    row.update(interleaved(campaign, {"loop": (n_loop, "loop", 64), "grouped": (n_fast, "grouped", 256)},
                           args.rounds))
    row["grouped/loop"] = row["grouped"] / row["loop"]
    work = jaxfi.executors.downstream_work(apply_fn, params, images, [CASES[case][1]()])
    row["downstream_work"], row["mac_bound"] = work, 1.0 / work if work else float("inf")
    for executor in ([] if name == "resnet18" else ["map", "vmap"]):
        try:
            _, _, row[executor] = timed_run(campaign, min(n_loop, 64), executor, 64)
        except jaxfi.executors.NotBitwiseError:
            row[executor] = "not bitwise"
    row["agreement_uniform"], row["disagreeing_uniform"] = agreement(fast, reference)
    row["agreement_trials"] = n_loop
    if args.nonfinite and case != "ber":
        row.update(stratum_agreement((apply_fn, params, images, labels), case, "nonfinite", args.nonfinite, []))
    row["fast_sdc_rate"] = float(fast.table["sdc"].iloc[:n_loop].mean())
    row["loop_sdc_rate"] = float(reference.table["sdc"].mean())
    if args.campaign:
        row.update(fresh_campaigns(name, case, args))
        row["campaign_loop_estimate_s"] = row["loop_compile_s"] + args.campaign / row["loop"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="cnn,lenet5,resnet8,resnet18")
    parser.add_argument("--cases", default="weights,activations,ber")
    parser.add_argument("--trials", type=int, default=1024, help="most trials the loop runs per case")
    parser.add_argument("--nonfinite", type=int, default=512,
                        help="trials of the NaN/Inf stratum per case (0: skip; the ber case has none of its own)")
    parser.add_argument("--campaign", type=int, default=9604,
                        help="trials of the fresh-process campaign (0: skip); ResNet-18 skips it")
    parser.add_argument("--rounds", type=int, default=3,
                        help="turns the loop and grouped take at steady state (median rate of each)")
    parser.add_argument("--fresh_repeats", type=int, default=2,
                        help="turns auto and grouped take at the fresh-process campaign (least time of each)")
    parser.add_argument("--agreement_only", action="store_true",
                        help="only verdict agreement per stratum (--trials uniform, --nonfinite NaN/Inf trials; "
                             "grouped, map, vmap against the loop), no timings")
    parser.add_argument("--fresh_only", action="store_true",
                        help="only the fresh-process campaigns (auto, grouped, grouped with a filled cache)")
    parser.add_argument("--workdir", default="runs/models")
    parser.add_argument("--out", default="", help="also write the rows as JSON lines here")
    args = parser.parse_args()
    for name in args.models.split(","):
        for case in args.cases.split(","):
            local = argparse.Namespace(**{**vars(args), "campaign": 0 if name == "resnet18" else args.campaign})
            if args.agreement_only:
                row = agreement_only(name, case, local)
            elif args.fresh_only:
                row = {"model": name, "case": CASES[case][0], **fresh_campaigns(name, case, local)}
            else:
                row = bench(name, case, local)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--fresh":
        _fresh(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6], sys.argv[7])
    else:
        main()
