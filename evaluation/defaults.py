"""Which defaults the measurements support: the solver, each solver's schedule and options.

    python -m evaluation.defaults          # reads the untrained sweeps of evaluation.learned_benchmark

The sweeps come from ``results/sweeps.json`` (written by ``learned_benchmark``, e.g. with
``--sweep-only``); a model missing there is read from the benchmark's cache if that holds it.
``--sweeps A.json B.json`` reads those records instead, a model in a later file replacing the
same model in an earlier one (a sweep rerun on new weights into its own ``--out`` folder).

For every benchmark model and NFE 3-10 the sweep gives the endpoint RMSE of every solver x
schedule x AFS configuration (held-out seeds; exact endpoints or converged samples).  A
configuration's *ratio* at one (model, NFE) is its RMSE over the best configuration's there; a
choice is scored by the geometric mean of its ratios over all models and NFEs (1 = always the best).

* each solver's default schedule: the schedule with the lowest score, AFS off (AFS is a request,
  not a default: it hurts where the data mean is far from zero, the bundled model);
* option variants: ipndm_v legacy vs exact weights, DPM-Solver++ reference vs exact third order;
* the default solver: the solver whose default configuration scores lowest.

Writes results/defaults.json and results/defaults.md.
"""
from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

from evaluation.common import RESULTS, machine, markdown_table
from evaluation.learned_benchmark import CACHE_DIR, MODELS, SWEEPS, cache_path


def recorded_entries(records):
    """{model: sweep record entry} from the given sweeps.json files, later files winning per model."""
    entries = {}
    for record in records:
        entries.update(json.loads(Path(record).read_text()))
    return entries


def recorded_sweeps(record=RESULTS / SWEEPS, cache_dir=CACHE_DIR):
    """{model: {"label @ nfe": rmse}}: the committed record first, the benchmark's cache for the rest."""
    sweeps = {spec: entry["sweep"] for spec, entry in
              (recorded_entries([record]) if record.is_file() else {}).items()}
    for spec in MODELS:
        path = cache_path(spec, cache_dir)
        if spec not in sweeps and path.is_file():
            sweeps[spec] = json.loads(path.read_text())["sweep"]
    return sweeps


def load_sweeps(nfes=range(3, 11), sweeps=None):
    """{(model, nfe): {label: rmse}} from the recorded sweeps."""
    table = defaultdict(dict)
    for spec, sweep in (recorded_sweeps() if sweeps is None else sweeps).items():
        for key, value in sweep.items():
            label, nfe = key.rsplit(" @ ", 1)
            if value is not None and int(nfe) in nfes:
                table[(spec, int(nfe))][label] = value
    return table


def parts(label):
    solver, schedule, *afs = [p.strip() for p in label.split("|")]
    return solver, schedule, bool(afs)


def score(table, predicate):
    """Geometric-mean ratio to the best, over the (model, NFE) cells where a matching
    configuration exists (the best matching one in each cell), and the number of cells."""
    logs = []
    for cell, rows in table.items():
        best = min(rows.values())
        mine = [v for label, v in rows.items() if predicate(label)]
        if mine:
            logs.append(math.log(min(mine) / best))
    return (math.exp(sum(logs) / len(logs)) if logs else float("inf")), len(logs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweeps", nargs="+", type=Path, metavar="SWEEPS_JSON",
                        help="sweep records to score (default: results/sweeps.json, then the cache); "
                             "a model in a later file replaces it in an earlier one")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.sweeps or [] if not p.is_file()]
    if missing:
        parser.error(f"no such sweep record: {', '.join(missing)}")
    default_record = RESULTS / SWEEPS
    entries = recorded_entries(args.sweeps or ([default_record] if default_record.is_file() else []))
    table = load_sweeps(sweeps={m: e["sweep"] for m, e in entries.items()} if args.sweeps else None)
    models = sorted({m for m, _ in table})
    solvers = sorted({parts(label)[0] for rows in table.values() for label in rows})
    schedules = sorted({parts(label)[1] for rows in table.values() for label in rows})
    per_solver = {}
    for solver in solvers:
        by_schedule = {s: score(table, lambda l, s=s, solver=solver: parts(l)[0] == solver and parts(l)[1] == s
                                and not parts(l)[2])[0] for s in schedules}
        with_afs = {s: score(table, lambda l, s=s, solver=solver: parts(l)[0] == solver and parts(l)[1] == s
                             and parts(l)[2])[0] for s in schedules}
        best = min(by_schedule, key=by_schedule.get)
        per_solver[solver] = {"schedules": by_schedule, "schedules_with_afs": with_afs, "best_schedule": best,
                              "score": by_schedule[best]}
    ranking = sorted(per_solver, key=lambda s: per_solver[s]["score"])
    report = {"models": models, "cells": len(table), "per_solver": per_solver, "ranking": ranking,
              "sweeps": [str(p) for p in args.sweeps or [default_record]],
              "weights": {m: e.get("weights") for m, e in entries.items()},
              "machine": machine()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "defaults.json").write_text(json.dumps(report, indent=1) + "\n")
    rows = [[s, f"{per_solver[s]['score']:.2f}", per_solver[s]["best_schedule"],
             *[f"{per_solver[s]['schedules'][k]:.2f} / {per_solver[s]['schedules_with_afs'][k]:.2f}" for k in schedules]]
            for s in ranking]
    md = ["# Defaults by measurement", "",
          f"Models: {', '.join(models)}; NFE 3-10 ({len(table)} model x NFE cells). Score: geometric mean over "
          "the cells of RMSE / best RMSE in that cell (1.00 = always the best configuration). Columns per "
          "schedule: without AFS / with AFS.", "",
          "Sweeps: " + ", ".join(f"`{p}`" for p in report["sweeps"]) + "; weights (fingerprints) per model: "
          + ", ".join(f"{m} `{w}`" for m, w in sorted(report["weights"].items())) + ".", "",
          markdown_table(["solver (variant)", "score (best schedule, no AFS)", "best schedule",
                          *[f"{k}" for k in schedules]], rows), ""]
    (RESULTS / "defaults.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
