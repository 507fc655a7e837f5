"""A rate sweep as one campaign per point against one program per model, measured side by side.

For each model it runs, in a fresh process each (no compilation cache, so
every compile is paid), the same fault sweep two ways:

* ``per_point``: one ``jaxfi.Campaign`` per rate, each with a single-rate
  plan (how the study ran before sweeps were data): every point traces and
  compiles its own trial program;
* ``sweep``: one campaign whose plan's ``ber`` is every rate
  (``jaxfi.study.plans_for`` of the points): one trial program serves them
  all, ``Campaign.run(point=j)`` per point.

Both run ``--trials`` trials at every point with ``--executor`` and print
one JSON line: XLA programs compiled (``/jax/core/compile/backend_compile_duration``
events, every compile the process makes, tiny ones included), their
seconds, and the wall time from the first ``Campaign`` to the last result.
The table then gives the ratios per_point / sweep. The trials of both ways
draw different faults (a sweep's cap is its largest rate's), so the
tables differ; their records are checked in the tests, not here.

    python benchmarks/sweep.py [--models mlp,lenet5,resnet8] [--trials 64] [--executor loop]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def _measure(way: str, model: str, workdir: str, trials: int, executor: str, rates: list[float]) -> dict:
    """Runs one way of the sweep in this process and returns its counts and times."""
    import jax

    import jaxfi
    from jaxfi import study

    compiles = {"count": 0, "seconds": 0.0}

    def listen(event: str, duration: float, **kwargs) -> None:
        if event == COMPILE_EVENT:
            compiles["count"] += 1
            compiles["seconds"] += duration

    subject, = study.load_subjects([model], pathlib.Path(workdir), eval_size=128, seed=0, log=None)
    points = [study.Point(study.WEIGHTS, rate=r) for r in rates]
    jax.monitoring.register_event_duration_secs_listener(listen)
    began = time.perf_counter()
    if way == "sweep":
        campaign = jaxfi.Campaign(subject.apply_fn, subject.params, subject.images, subject.labels,
                                  study.plans_for(subject, points), seed=0, outcomes=(study.logit_deviation,))
        for j in range(len(points)):
            campaign.run(trials, point=j, executor=executor, quiet=True)
    else:
        for p in points:
            campaign = jaxfi.Campaign(subject.apply_fn, subject.params, subject.images, subject.labels,
                                      study.plans_for(subject, p), seed=0, outcomes=(study.logit_deviation,))
            campaign.run(trials, executor=executor, quiet=True)
    wall = time.perf_counter() - began
    return {"way": way, "model": model, "points": len(points), "trials_per_point": trials,
            "programs": compiles["count"], "compile_s": round(compiles["seconds"], 2), "wall_s": round(wall, 2)}


def main() -> None:
    """Trains (or loads) the models, then measures both ways per model in fresh processes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,lenet5,resnet8")
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--executor", default="loop")
    parser.add_argument("--rates", default="1e-7,1e-6,3e-6,1e-5,3e-5,1e-4,3e-4")
    parser.add_argument("--workdir", default=str(REPO / "workdir" / "bench"))
    parser.add_argument("--one", nargs=2, metavar=("WAY", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    if args.one:
        print(json.dumps(_measure(*args.one, args.workdir, args.trials, args.executor, rates)))
        return
    from jaxfi import training

    models = args.models.split(",")
    for model in models:
        training.train_or_load(model, pathlib.Path(args.workdir) / "models", log=None)
    load = os.getloadavg()
    print(f"# load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} ({os.cpu_count()} cores)")
    rows = []
    for model in models:
        for way in ("per_point", "sweep"):
            command = [sys.executable, __file__, "--one", way, model, "--trials", str(args.trials),
                       "--executor", args.executor, "--rates", args.rates, "--workdir", args.workdir]
            out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| model | programs before / after | compile s before / after | wall s before / after | "
          "wall ratio |\n|---|---|---|---|---|")
    for model in models:
        before, after = (next(r for r in rows if r["model"] == model and r["way"] == w)
                         for w in ("per_point", "sweep"))
        print(f"| {model} | {before['programs']} / {after['programs']} | {before['compile_s']} / "
              f"{after['compile_s']} | {before['wall_s']} / {after['wall_s']} | "
              f"{before['wall_s'] / after['wall_s']:.2f}x |")
    load = os.getloadavg()
    print(f"# load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
