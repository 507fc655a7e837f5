"""Peak memory of a campaign against its number of trials, at a fixed chunk size.

Runs the same campaign (LeNet-5, 256 test images, bit error rate ``--rate``
over weights, 1e-7 by default, grouped executor, chunks of 1,000) with 1,000
and with ``--trials`` trials (100,000 by default), each in a fresh process,
and prints each process's peak resident memory and their ratio. Device
buffers are sized by the chunk (a trial's fault record has one slot per
possible fault up to the plan's static cap, which grows with the rate); what
grows with the trial count is the host-side result table (one row of
outcomes and fault record per trial).

    python benchmarks/memory.py [--rate 1e-7] [--trials 100000]
"""

import argparse
import resource
import subprocess
import sys

CHUNK = 1000


def _campaign(trials: int, rate: float) -> None:
    import jaxfi
    from jaxfi import data, models, training

    model, variables, _ = training.train_or_load("lenet5", "runs/models", log=lambda *a: None)
    apply_fn, params = models.bind_inference(model, variables)
    test = data.eval_subset(data.load("mnist5k", "test"), 256)
    plan = jaxfi.Plan(jaxfi.Params(), jaxfi.BitFlip(), ber=rate)
    campaign = jaxfi.Campaign(apply_fn, params, test.images, test.labels, plan, seed=0)
    result = campaign.run(trials=trials, executor="grouped", chunk_size=CHUNK, quiet=True)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{trials} {len(result.table)} {peak_mib:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=1e-7, help="bit error rate over weights")
    parser.add_argument("--trials", type=int, default=100_000, help="the larger campaign's trials")
    parser.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)  # a child process's trials
    args = parser.parse_args()
    if args.one:
        _campaign(args.one, args.rate)
        return
    peaks = {}
    print(f"LeNet-5, BER {args.rate:g} over weights, grouped executor")
    for trials in (1_000, args.trials):
        out = subprocess.run([sys.executable, __file__, "--rate", repr(args.rate), "--one", str(trials)],
                             capture_output=True, text=True, check=True).stdout.split()
        peaks[trials] = float(out[-1])
        print(f"{trials:>7,} trials (chunk {CHUNK}): {int(out[-2]):,} rows, peak RSS {peaks[trials]:.1f} MiB")
    print(f"peak({args.trials:,}) / peak(1,000) = {peaks[args.trials] / peaks[1_000]:.3f}")


if __name__ == "__main__":
    main()
