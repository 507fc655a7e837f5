"""Training trials per second: the vectorized TrainingCampaign against a Python loop of independent runs.

    python benchmarks/training.py [--trials=64] [--loop_trials=3]

For the MLP and LeNet-5 on the embedded mnist5k (from a fresh init, Adam,
batch 64, 100 steps), each trial flips one random bit of one backward value
(or weight: ``--kinds``) at a step uniform over the run. Prints, from one run, per model:

- map: ``TrainingCampaign.run_trials`` in chunks of 16 (``lax.map`` over
  trials of a ``lax.scan`` over steps), plus one golden run (shared by all
  trials), in trials per second;
- loop executor: the same with ``executor="loop"`` (a Python loop over
  trials and steps of the jitted steps, same shared prefix and early stops);
- independent: ``TrainingCampaign.independent``, each trial an independent
  100-step training run (a Python loop of jitted steps from the start), the
  way a training-fault study is done without jaxfi;
- the best campaign rate over the independent one, and the work bound: the
  steps independent runs take over the steps the campaign takes (each trial
  from its fault step to its end or early stop, plus the golden run shared
  by the trials), the ratio a compute-bound machine cannot beat. Compile
  times are excluded and printed apart.
"""

import argparse
import time

import jax
import numpy as np

import jaxfi
from jaxfi.experiments.training_faults import KIND_SITES, training_setup

STEPS, BATCH, CHUNK = 100, 64, 16


def _campaign_rate(campaign: jaxfi.TrainingCampaign, trials: int, executor: str) -> tuple[float, float, float]:
    """(trials per second including one golden run, share of trials stopped early, work bound);
    compiled before timing."""
    campaign.run_trials([-1], executor)
    began = time.perf_counter()
    campaign.golden_run(executor)
    outs = [campaign.run_trials(range(a, min(a + CHUNK, trials)), executor) for a in range(0, trials, CHUNK)]
    rate = trials / (time.perf_counter() - began)
    stopped = np.concatenate([o.stopped for o in outs])
    fault_step = np.concatenate([o.fault_step for o in outs])
    ran = np.where(stopped >= 0, stopped + 1, STEPS) - fault_step
    return rate, float(np.mean(stopped >= 0)), trials * STEPS / (ran.sum() + STEPS)


def bench(name: str, kind: str, trials: int, loop_trials: int) -> dict:
    setup = training_setup(name, steps=STEPS, batch_size=BATCH, learning_rate=1e-3, seed=0, eval_size=1000)
    campaign = jaxfi.TrainingCampaign(setup.loss_fn, setup.params, setup.optimizer, setup.batches,
                                      jaxfi.Plan(KIND_SITES[kind]), metric_fn=setup.metric_fn, seed=0)
    began = time.perf_counter()
    campaign.golden  # noqa: B018 (compiles and runs the golden program once)
    campaign.run_trials([-1] * CHUNK)  # compiles the chunk program
    compile_campaign = time.perf_counter() - began
    mapped, stopped, bound = _campaign_rate(campaign, trials, "map")
    began = time.perf_counter()
    campaign.independent(10**6)  # compiles the steps
    compile_loop = time.perf_counter() - began
    hosted, _, _ = _campaign_rate(campaign, trials, "loop")
    began = time.perf_counter()
    for i in range(loop_trials):
        jax.block_until_ready(campaign.independent(i)[0])
    loop = loop_trials / (time.perf_counter() - began)
    return {"model": name, "kind": kind, "map": mapped, "hosted": hosted, "loop": loop,
            "compile_campaign": compile_campaign, "compile_loop": compile_loop, "stopped_early": stopped,
            "bound": bound}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--loop_trials", type=int, default=3)
    parser.add_argument("--kinds", default="backward,weights", help="site kinds, comma-separated")
    args = parser.parse_args()
    print(f"{STEPS}-step training runs, batch {BATCH}, one bit flip per trial at a step uniform over the run")
    print(f"{'model':8s} {'faults in':10s} {'map':>7s} {'loop executor':>14s} {'independent':>12s} "
          f"{'best ratio':>10s} {'work bound':>10s} {'stopped early':>14s} {'compile s (map, steps)':>24s}")
    for name in ("mlp", "lenet5"):
        for kind in args.kinds.split(","):
            r = bench(name, kind, args.trials, args.loop_trials)
            print(f"{r['model']:8s} {r['kind']:10s} {r['map']:7.2f} {r['hosted']:14.2f} {r['loop']:12.2f} "
                  f"{max(r['map'], r['hosted']) / r['loop']:9.1f}x {r['bound']:9.1f}x {r['stopped_early']:14.0%} "
                  f"{r['compile_campaign']:12.1f}, {r['compile_loop']:.1f}", flush=True)


if __name__ == "__main__":
    main()
