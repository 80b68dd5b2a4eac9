"""GITS with the solver-aware cost (``--metric solver``) against the Euler-jump costs dev and l2.

    python -m evaluation.gits_solver_metric                                  # digits + synthetic mixture
    python -m evaluation.gits_solver_metric --models gmm:digits --seeds 64   # quick

For each model and one-evaluation solver, one warm-up (256 seeds from 100,000; the iPNDM teacher on
61 polynomial points) prices every jump three ways: ``dev`` (the paper's, coefficient 1.15), ``l2``
(coefficient 1.0) and ``solver`` (the student's own update from the teacher's state, coefficients
1.0 and 1.15); the DP picks a schedule per NFE 3-10, and each schedule is scored by its mean
endpoint RMSE against the exact ODE endpoint on the test seeds 0..N-1, beside the polynomial and
logSNR grids.  Writes results/gits_solver_metric.json and .md.
"""
from __future__ import annotations

import argparse
import json

import torch

from diffsampler import gits, sample
from diffsampler.fileio import write_atomic
from evaluation.common import RESULTS, exact_endpoints, load_model, machine, markdown_table, rmse_per_seed

SOLVERS = ("euler", "ipndm", "dpmpp", "unipc")
SETTINGS = (("dev", 1.15), ("l2", 1.0), ("solver", 1.0), ("solver", 1.15))
NFES = tuple(range(3, 11))


def run_model(spec: str, seeds: int, warmup: int, log) -> dict:
    model = load_model(spec)
    ref, _ = exact_endpoints(model, spec, 0, seeds)
    noise = torch.stack([torch.randn(model.shape, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
                         for s in range(seeds)])
    rmse = lambda **kw: float(rmse_per_seed(sample(model, noise, **kw).samples, ref).mean())
    rows = {}
    for solver in SOLVERS:
        warm = gits.warm_ups(model, model.shape, metrics=("dev", "l2", "solver"), warmup=warmup, first_seed=100_000,
                             dtype=torch.float64, student=solver)
        for nfe in NFES:
            row = {"polynomial": rmse(solver=solver, nfe=nfe, schedule="polynomial"),
                   "logsnr": rmse(solver=solver, nfe=nfe, schedule="logsnr")}
            for metric, coeff in SETTINGS:
                row[f"{metric} {coeff:g}"] = rmse(solver=solver, schedule=warm[metric].schedule(nfe, solver, coeff=coeff))
            rows.setdefault(solver, {})[str(nfe)] = row
            log(f"{spec} {solver} NFE {nfe}: " + "  ".join(f"{k} {v:.4f}" for k, v in row.items()))
    return rows


def markdown(report) -> str:
    lines = ["# GITS: the solver-aware cost against the Euler-jump costs", "",
             f"Recorded {report['machine']['date']}; mean endpoint RMSE on seeds 0..{report['seeds'] - 1} against the "
             f"exact ODE endpoint; warm-up {report['warmup']} seeds. Bold: the lowest of the GITS rows.", ""]
    for spec, rows in report["models"].items():
        lines += [f"## {spec}", ""]
        cols = list(next(iter(next(iter(rows.values())).values())))
        table = []
        for solver, by_nfe in rows.items():
            for nfe, row in by_nfe.items():
                gits_cols = [c for c in cols if c not in ("polynomial", "logsnr")]
                best = min(gits_cols, key=row.get)
                table.append([solver, nfe] + [f"**{row[c]:.4f}**" if c == best else f"{row[c]:.4f}" for c in cols])
        lines += [markdown_table(["solver", "NFE"] + cols, table), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="gmm:digits,gmm:synthetic:16:3x32x32:0")
    parser.add_argument("--seeds", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=256)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    report = {"seeds": args.seeds, "warmup": args.warmup, "models": {}}
    for spec in args.models.split(","):
        report["models"][spec] = run_model(spec, args.seeds, args.warmup, print)
    report["machine"] = machine()
    write_atomic(f"{args.out}/gits_solver_metric.json", json.dumps(report, indent=1).encode() + b"\n")
    write_atomic(f"{args.out}/gits_solver_metric.md", markdown(report).encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
