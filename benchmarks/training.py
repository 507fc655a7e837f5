"""Training trials per second: the vectorized TrainingCampaign against a Python loop of independent runs.

    python benchmarks/training.py [--trials=64] [--loop_trials=3]

For the MLP and LeNet-5 on the embedded mnist5k (from a fresh init, Adam,
batch 64, 100 steps), each trial flips one random bit of one backward value
at a step uniform over the run. Prints, from one run, per model:

- campaign: ``TrainingCampaign.run_trials`` in chunks of 16 (``lax.map``
  over trials of a ``lax.scan`` over steps), plus one golden run (shared by
  all trials), in trials per second;
- loop: ``TrainingCampaign.independent``, each trial an independent
  100-step training run (a Python loop of a jitted faulty step), the way a
  training-fault study is done without jaxfi;
- their ratio. Compile times are excluded from both and printed apart.
"""

import argparse
import time

import jax
import numpy as np

import jaxfi
from jaxfi.experiments.training_faults import KIND_SITES, training_setup

STEPS, BATCH, CHUNK = 100, 64, 16


def bench(name: str, trials: int, loop_trials: int) -> dict:
    setup = training_setup(name, steps=STEPS, batch_size=BATCH, learning_rate=1e-3, seed=0, eval_size=1000)
    campaign = jaxfi.TrainingCampaign(setup.loss_fn, setup.params, setup.optimizer, setup.batches,
                                      jaxfi.Plan(KIND_SITES["backward"]), metric_fn=setup.metric_fn, seed=0)
    began = time.perf_counter()
    campaign.golden  # noqa: B018 (compiles and runs the golden program once)
    campaign.run_trials([-1] * CHUNK)  # compiles the chunk program
    compile_campaign = time.perf_counter() - began
    began = time.perf_counter()
    campaign.golden_run()
    outcomes = []
    for start in range(0, trials, CHUNK):
        out = campaign.run_trials(range(start, min(start + CHUNK, trials)))
        outcomes.append(np.asarray(out.stopped))
    vectorized = time.perf_counter() - began
    stopped = np.concatenate(outcomes)
    began = time.perf_counter()
    campaign.independent(10**6)  # compiles the step
    compile_loop = time.perf_counter() - began
    began = time.perf_counter()
    for i in range(loop_trials):
        jax.block_until_ready(campaign.independent(i)[0])
    loop = time.perf_counter() - began
    return {"model": name, "campaign": trials / vectorized, "loop": loop_trials / loop,
            "compile_campaign": compile_campaign, "compile_loop": compile_loop,
            "stopped_early": float(np.mean(stopped >= 0))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--loop_trials", type=int, default=3)
    args = parser.parse_args()
    print(f"{STEPS}-step training runs, batch {BATCH}, one bit flip in a backward value per trial")
    print(f"{'model':8s} {'campaign trials/s':>18s} {'loop trials/s':>14s} {'ratio':>7s} "
          f"{'stopped early':>14s} {'compile s (campaign, loop)':>28s}")
    for name in ("mlp", "lenet5"):
        r = bench(name, args.trials, args.loop_trials)
        print(f"{r['model']:8s} {r['campaign']:18.2f} {r['loop']:14.2f} {r['campaign'] / r['loop']:6.1f}x "
              f"{r['stopped_early']:14.0%} {r['compile_campaign']:14.1f}, {r['compile_loop']:.1f}", flush=True)


if __name__ == "__main__":
    main()
