"""Campaign throughput against the peers' per-trial loop, measured side by side.

For LeNet-5 and ResNet-8 at batch 256 on MNIST-5k images, and three fault
cases (one random single-bit flip in any weight, uniform over weight bits; one
in any activation; a bit error rate of 1e-6 over weights), prints trials/s of:
the per-trial Python loop over a jitted faulty forward (how PyTorchFI and the
other peers run), every executor, and what "auto" picks; the golden forward
rate; and each rate's ratio to the loop. Steady state: programs are compiled
before timing (compile seconds are listed apart); every executor's trials are
checked bit for bit against the loop's. For single-bit weight faults it also
compares the paths that are not bitwise (the sparse dense-layer path, split
programs used without probing) with exact recomputation, trial by trial.
Models are trained on MNIST-5k first (cached in --workdir).

    python benchmarks/throughput.py [--models lenet5,resnet8] [--trials 1024]
"""

import argparse
import statistics
import time

import jax
import numpy as np

import jaxfi
import jaxfi.data
from jaxfi._src import executors as ex
from jaxfi._src import outcomes
from jaxfi.models import bind_inference
from jaxfi.training import train_or_load

BATCH = 256
CASES = {
    "weights, 1 bit flip": jaxfi.Plan(jaxfi.Params(), jaxfi.BitFlip(), count=1),
    "activations, 1 bit flip": jaxfi.Plan(jaxfi.Activations(), jaxfi.BitFlip(), count=1),
    "weights, BER 1e-6": jaxfi.Plan(jaxfi.Params(), jaxfi.BitFlip(), ber=1e-6),
}


def _golden_rate(apply_fn, params, images, repeats: int = 10) -> float:
    forward = jax.jit(apply_fn)
    jax.block_until_ready(forward(params, images))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(forward(params, images))
        times.append(time.perf_counter() - start)
    return 1.0 / statistics.median(times)


def _timed(runner, start: int, trials: int):
    runner(start, start + min(runner.width, trials))
    began = time.perf_counter()
    outs = [runner(a, min(a + runner.width, start + trials))
            for a in range(start, start + trials, runner.width)]
    rate = trials / (time.perf_counter() - began)
    return rate, jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


def _case(trials: ex.Trials, args, golden: float) -> None:
    devices = jax.local_devices()
    loop = ex.LoopExecutor().build(trials, args.loop_trials, devices)
    loop_rate, reference = _timed(loop, 0, args.loop_trials)
    print(f"  {'golden forward':<26}{golden:9.1f} batches/s {golden / loop_rate:8.2f}x loop")
    print(f"  {'loop (peers)':<26}{loop_rate:9.1f} trials/s  {1.0:8.2f}x loop")
    executors = [(ex.MapExecutor(), args.chunk, args.chunk), (ex.VmapExecutor(), args.chunk, args.chunk),
                 (ex.GroupedExecutor(), args.trials, args.trials)]
    for executor, chunk, count in executors:
        runner = executor.build(trials, chunk, devices)
        rate, out = _timed(runner, 0, count)
        same = ex.same_bits(jax.tree.map(lambda a: a[:args.loop_trials], out), reference)
        print(f"  {runner.name:<26}{rate:9.1f} trials/s  {rate / loop_rate:8.2f}x loop"
              f"   compile {runner.compile_seconds:5.1f} s  bitwise {same}")
    chosen, _, table = ex.choose(ex.AutoExecutor(), trials, args.chunk, devices, 0, args.chunk)
    best = table.loc[table["chosen"], "trials_per_s"].iloc[0]
    print(f"  auto picks {chosen.name!r} (probe rate {best:.1f} trials/s on a {args.chunk}-trial chunk)")


def _agreement(trials: ex.Trials, apply_fn, params, images, labels, args) -> None:
    """Outcomes of the paths that are not bitwise (sparse dense layers; split
    programs used without probing) against exact recomputation, trial by trial."""
    devices = jax.local_devices()
    golden = outcomes.golden(jax.jit(apply_fn)(params, images), labels)
    sdc = {}
    for executor in (ex.GroupedExecutor(), ex.GroupedExecutor(sparse=True), ex.GroupedExecutor(bitwise=False)):
        runner = executor.build(trials, args.trials, devices)
        rate, out = _timed(runner, args.trials, args.trials)
        sdc[runner.name] = outcomes.classification(golden, np.asarray(out[0]))["sdc"]
        lo, hi = jaxfi.wilson(int(sdc[runner.name].sum()), len(sdc[runner.name]))
        print(f"  {runner.name:<34}{rate:9.1f} trials/s  SDC rate {sdc[runner.name].mean():.4f} [{lo:.4f}, {hi:.4f}]")
    exact, *fast = sdc
    for name in fast:
        agree = float((sdc[name] == sdc[exact]).mean())
        print(f"  {name} vs exact: same SDC verdict in {agree:.2%} of {len(sdc[name])} trials")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lenet5,resnet8")
    parser.add_argument("--trials", type=int, default=1024, help="trials timed for grouped")
    parser.add_argument("--chunk", type=int, default=64, help="chunk of map/vmap/auto")
    parser.add_argument("--loop_trials", type=int, default=32, help="trials timed for the loop")
    parser.add_argument("--workdir", default="runs/models", help="trained models (trained if absent)")
    args = parser.parse_args()
    test = jaxfi.data.load("mnist5k", "test", num_examples=BATCH)
    images = test.images
    print(f"jax {jax.__version__}, {jax.default_backend()}, {len(jax.local_devices())} device(s), batch {BATCH}")
    for name in args.models.split(","):
        model, variables, _ = train_or_load(name, args.workdir, log=lambda *a: None)
        apply_fn, params = bind_inference(model, variables)
        golden = _golden_rate(apply_fn, params, images)
        for case, plan in CASES.items():
            print(f"{name}: {case}")
            trials = ex.Trials(ex.trial_function(jaxfi.faulty(apply_fn, plan)), jax.random.key(0),
                               params, images, apply_fn, (plan,))
            _case(trials, args, golden)
            if case == "weights, 1 bit flip":
                _agreement(trials, apply_fn, params, images, test.labels, args)


if __name__ == "__main__":
    main()
