"""Trials per second of each executor on LeNet-5, batch 256, single-bit weight faults.

Prints, from one run: the golden forward-pass rate (jit(apply_fn), one batch
per call), the steady-state trials/s of each executor over whole chunks
(compile time listed apart), their ratio to the golden rate, whether each
reproduced the unbatched trials bit for bit, and what "auto" chooses.

    python benchmarks/executors.py [--sites REGEX] [--chunk 64] [--trials 128]
"""

import argparse
import statistics
import time

import jax
import numpy as np

import jaxfi
import jaxfi.data
from jaxfi._src import executors as ex
from jaxfi.models import bind_inference, get_model, init_variables, param_count

BATCH = 256


def _golden_rate(apply_fn, params, images, repeats: int = 20) -> float:
    forward = jax.jit(apply_fn)
    jax.block_until_ready(forward(params, images))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(forward(params, images))
        times.append(time.perf_counter() - start)
    return 1.0 / statistics.median(times)


def _rate(runner: ex.Runner, trials: int) -> tuple[float, ex.Outputs]:
    runner(0, runner.width)  # warm: first dispatch and allocations
    start = time.perf_counter()
    outs = [runner(a, min(a + runner.width, trials)) for a in range(0, trials, runner.width)]
    elapsed = time.perf_counter() - start
    return trials / elapsed, jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", default=None, help="regex of parameter leaves (default: all)")
    parser.add_argument("--chunk", type=int, default=64, help="trials per chunk")
    parser.add_argument("--trials", type=int, default=128, help="trials timed per executor")
    args = parser.parse_args()

    model = get_model("lenet5")
    apply_fn, params = bind_inference(model, init_variables(model, (28, 28, 1)))
    images = jaxfi.data.load("mnist5k", "test", num_examples=BATCH).images
    plan = jaxfi.Plan(jaxfi.Params(args.sites), jaxfi.BitFlip())
    trials = ex.Trials(ex.trial_function(jaxfi.faulty(apply_fn, plan)), jax.random.key(0),
                       params, images, apply_fn, (plan,))
    golden = _golden_rate(apply_fn, params, images)

    print(f"LeNet-5, {param_count(params):,} parameters, batch {BATCH}, one "
          f"bit flip per trial in params({args.sites or 'all'}), chunk {args.chunk}, "
          f"{len(jax.local_devices())} device(s)")
    print(f"{'golden forward':<22}{golden:10.1f} batches/s")
    reference = None
    for executor in (ex.LoopExecutor(), ex.MapExecutor(), ex.MapExecutor(8), ex.VmapExecutor(),
                     ex.GroupedExecutor()):
        runner = executor.build(trials, args.chunk, jax.local_devices())
        rate, out = _rate(runner, args.trials)
        reference = out if reference is None else reference
        print(f"{executor.name:<22}{rate:10.1f} trials/s  {rate / golden:6.2f}x golden  "
              f"compile {runner.compile_seconds:5.1f} s  bitwise {ex.same_bits(out, reference)}")
    runner, _, table = ex.choose(ex.AutoExecutor(), trials, args.chunk, jax.local_devices(),
                                 0, args.chunk)
    print(f"auto chooses {runner.name!r} from:\n{table.to_string(index=False)}")


if __name__ == "__main__":
    main()
