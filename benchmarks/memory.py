"""Peak memory of a campaign against its number of trials, at a fixed chunk size.

Runs the same campaign (LeNet-5, 256 test images, bit error rate 1e-7 over
weights, grouped executor, chunks of 1,000) with 1,000 and with 100,000 trials,
each in a fresh process, and prints each process's peak resident memory and
their ratio. Device buffers are sized by the chunk; what grows with the trial
count is the host-side result table (one row of outcomes and fault record per
trial).

    python benchmarks/memory.py
"""

import resource
import subprocess
import sys

CHUNK = 1000


def _campaign(trials: int) -> None:
    import jaxfi
    from jaxfi import data, models, training

    model, variables, _ = training.train_or_load("lenet5", "runs/models", log=lambda *a: None)
    apply_fn, params = models.bind_inference(model, variables)
    test = data.eval_subset(data.load("mnist5k", "test"), 256)
    plan = jaxfi.Plan(jaxfi.Params(), jaxfi.BitFlip(), ber=1e-7)
    campaign = jaxfi.Campaign(apply_fn, params, test.images, test.labels, plan, seed=0)
    result = campaign.run(trials=trials, executor="grouped", chunk_size=CHUNK, quiet=True)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{trials} {len(result.table)} {peak_mib:.1f}")


def main() -> None:
    peaks = {}
    for trials in (1_000, 100_000):
        out = subprocess.run([sys.executable, __file__, str(trials)], capture_output=True,
                             text=True, check=True).stdout.split()
        peaks[trials] = float(out[-1])
        print(f"{trials:>7,} trials (chunk {CHUNK}): {int(out[-2]):,} rows, peak RSS {peaks[trials]:.1f} MiB")
    print(f"peak(100,000) / peak(1,000) = {peaks[100_000] / peaks[1_000]:.3f}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        _campaign(int(sys.argv[1]))
    else:
        main()
