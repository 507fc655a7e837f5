"""Re-estimates the main job's low-rate points with many trials and another seed.

    python scripts/study_recheck.py --workdir=runs/study [--trials=1024] [--seed=1] [--rates=1e-7,1e-6,3e-6]

Loads the models the main job trained (WORKDIR/models, trained if absent),
evaluates them on the same 128 test images (image seed 0), runs ``--trials``
trials per rate with fault seed ``--seed`` (independent of the main job's
trials), and writes docs/study_recheck.csv: per (model, rate) the
re-estimate's error and 95% interval next to the main job's from
docs/study_resilience.csv, and whether the main job's interval holds the
re-estimate's mean. Stores live under WORKDIR/campaigns/recheck-seedS, so a
second run reads them back.
"""

from __future__ import annotations

import argparse
import pathlib

import pandas as pd

from jaxfi import study

REPO = pathlib.Path(__file__).resolve().parent.parent
MODELS = ("mlp", "lenet5", "resnet8")


def recheck(workdir: pathlib.Path, rates: list[float], trials: int, seed: int) -> pd.DataFrame:
    """The re-estimate beside the main job's committed table."""
    subjects = study.load_subjects(MODELS, workdir, eval_size=128, seed=0)
    points = [study.Point("weights", rate=r) for r in rates]
    jobs = [study.Job(s, study.plans_for(s, points), f"{s.label}/weights-{len(rates)}-rates", {"model": s.label},
                      tuple({"rate": r} for r in rates)) for s in subjects]
    done = study.run_sweep(jobs, workdir / "campaigns" / f"recheck-seed{seed}", trials=trials, seed=seed)
    main = pd.read_csv(REPO / "docs" / "study_resilience.csv").set_index(["model", "rate"])
    rows = []
    for d in done:
        figures = study.trial_figures(d.result).iloc[0]
        before = main.loc[(d.keys["model"], d.keys["rate"])]
        rows.append({"model": d.keys["model"], "rate": d.keys["rate"], "trials": int(figures["trials"]),
                     "seed": seed, "error": figures["error"], "error_lo": figures["error_lo"],
                     "error_hi": figures["error_hi"], "main_trials": int(before["trials"]),
                     "main_error": before["error"], "main_lo": before["error_lo"], "main_hi": before["error_hi"],
                     "main_holds_mean": bool(before["error_lo"] <= figures["error"] <= before["error_hi"])})
    return pd.DataFrame(rows)


def main() -> None:
    """Runs the re-estimate and writes docs/study_recheck.csv."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/study")
    parser.add_argument("--trials", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rates", default="1e-7,1e-6,3e-6")
    args = parser.parse_args()
    table = recheck(pathlib.Path(args.workdir).expanduser(), [float(r) for r in args.rates.split(",")],
                    args.trials, args.seed)
    table.to_csv(REPO / "docs" / "study_recheck.csv", index=False)
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
