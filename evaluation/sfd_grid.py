"""SFD's student grid on the bundled model: the teacher's ceiling for other student grids, teacher
points and teacher solvers (how good a student could get if it imitated its teacher perfectly), and
students distilled on them with the same budget.

    python -m evaluation.sfd_grid                            # results/sfd_grid.json, .md
    python -m evaluation.sfd_grid --students /tmp/a,/tmp/b   # with students distilled elsewhere

An SFD student imitates the teacher solve on its own grid refined with ``M`` points inside every
interval (``diffsampler.distill``), so that solve's quality bounds the student's.  The committed
student (polynomial grid, rho 7, ``M`` = 3, DPM-Solver++) has teacher FID 0.95 at NFE 2 and 0.68 at
NFE 4 (``results/sfd.md``), above the untrained configurations it is meant to beat (0.65 at NFE 5,
0.37 at NFE 8): no amount of distillation on that teacher meets issue 15's FID targets.  This script
measures the teacher solve (RMSE to converged samples on seeds 0..255, FID on seeds 0..1999 with the
bundled classifier, a random class per seed) for each candidate in ``CANDIDATES`` at each student NFE
and sets it beside the recorded targets (``results/sfd.json``'s best untrained configurations at NFE 5
and 8; unpaired: the baselines' features are not recomputed here).  Rows are cached with
``sfd_benchmark``'s (``evaluation/.cache/sfd/``).  ``--students`` adds the same two numbers for
student folders (``diffsampler distill --out DIR``) at each of their NFEs, with the grid and budget
their records give.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from diffsampler.defaults import DEFAULT_SCHEDULE, DEFAULT_SCHEDULE_OPTIONS
from diffsampler.distill.train import DEFAULT_TEACHER_OPTIONS
from diffsampler.plan import make_plan

from evaluation.common import RESULTS, fid_of, load_model, machine, markdown_table, write_report
from evaluation.sfd_benchmark import TARGETS, Bench, teacher_configuration

# (student grid, its options, teacher points per interval, teacher solver and options); first: the committed one
DPMPP = ("dpmpp", DEFAULT_TEACHER_OPTIONS)
CANDIDATES = [
    ("polynomial", {"rho": 7.0}, 3, DPMPP),
    ("polynomial", {"rho": 7.0}, 5, DPMPP),
    ("time_uniform", {"rho": 2.0}, 3, DPMPP),
    ("time_uniform", {"rho": 2.0}, 5, DPMPP),
    ("time_uniform", {"rho": 2.0}, 3, ("unipc", {})),
]


def candidate_label(schedule: str, options: dict, M: int, teacher: tuple) -> str:
    rho = options.get("rho")
    return f"{schedule}{f' rho {rho:g}' if rho is not None else ''}, M {M}, {teacher[0]}"


def record_of(model, schedule: str, options: dict, M: int, teacher: tuple, nfes: List[int]) -> dict:
    """The part of a distillation record that fixes its teacher solves (what ``teacher_configuration`` reads)."""
    sigmas = {str(k): list(make_plan("euler", k, schedule, schedule_options=options, afs=True, model=model).sigmas)
              for k in nfes}
    return {"teacher": {"name": teacher[0], **teacher[1]}, "M": M, "schedule": schedule,
            "schedule_options": options, "sigmas": sigmas}


def main(argv: Optional[List[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="fashion-mnist")
    p.add_argument("--nfes", default="2,3,4")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--rmse-seeds", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--students", default="", help="comma-separated student folders or model specs to score too")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    model = load_model(args.model)
    nfes = [int(v) for v in args.nfes.split(",")]
    bench = Bench(model, None, args.model, args.rmse_seeds, print)
    rows = []
    for schedule, options, M, teacher in CANDIDATES:
        record = record_of(model, schedule, options, M, teacher, nfes)
        for k in nfes:
            config = teacher_configuration(record, k)
            t0 = time.perf_counter()
            row = {"candidate": candidate_label(schedule, options, M, teacher), "student_nfe": k,
                   "teacher_nfe": config["nfe"], "rmse": bench.rmse(config),
                   "fid": fid_of(bench.features(config, args.images)["features"]),
                   "sigmas": config["sigmas"], "solver": config["solver"]}
            rows.append(row)
            print(f"[{time.perf_counter() - t_start:7.1f}s] {row['candidate']}, NFE {k} (teacher {row['teacher_nfe']}): "
                  f"RMSE {row['rmse']:.4f}, FID {row['fid']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    # the converged samples' own FID: what a student that imitated the ODE exactly would score
    # (common.converged's solve: Heun NFE 160 on the default schedule)
    reference = {"solver": "heun", "nfe": 160, "schedule": DEFAULT_SCHEDULE,
                 "schedule_options": dict(DEFAULT_SCHEDULE_OPTIONS), "afs": False}
    converged_fid = fid_of(bench.features(reference, args.images)["features"])
    print(f"[{time.perf_counter() - t_start:7.1f}s] converged (heun NFE 160): FID {converged_fid:.3f}", flush=True)
    students = []
    for spec in filter(None, args.students.split(",")):
        student = load_model(spec)
        info = student.info
        scorer = Bench(model, student, spec, args.rmse_seeds, print)
        for k in student.nfes:
            config = {"student": spec, "nfe": k}
            row = {"student": spec, "nfe": k, "schedule": info["schedule"], "schedule_options": info["schedule_options"],
                   "M": info["M"], "teacher": info["teacher"]["name"], "iters": info["iters"], "lr": info["lr"],
                   "train_seconds": info["train_seconds"], "rmse": scorer.rmse(config),
                   "fid": fid_of(scorer.features(config, args.images)["features"])}
            students.append(row)
            print(f"[{time.perf_counter() - t_start:7.1f}s] student {spec}, NFE {k}: RMSE {row['rmse']:.4f}, "
                  f"FID {row['fid']:.3f}", flush=True)
    recorded = json.loads((RESULTS / "sfd.json").read_text()).get("baselines", {})
    targets = {str(k): {ranking: {key: recorded[str(n)][ranking][key] for key in ("label", "rmse", "fid")}
                        for ranking in ("by_rmse", "by_fid")}
               for k, n in TARGETS.items() if str(n) in recorded}
    report = {"machine": machine(), "settings": vars(args) | {"out": str(args.out)}, "rows": rows,
              "converged_fid": converged_fid, "students": students, "targets": targets,
              "seconds": time.perf_counter() - t_start}
    write_report("sfd_grid", report, markdown(report), folder=args.out)
    return report


def markdown(report: dict) -> str:
    s, targets = report["settings"], report["targets"]
    lines = ["# The SFD teacher's ceiling on the bundled model", "",
             f"`python -m evaluation.sfd_grid` on {report['machine']['cpu']} "
             f"({report['machine']['threads']} threads), {report['machine']['date']}, {report['seconds'] / 60:.0f} min. "
             f"The teacher solve an SFD student at each NFE imitates (student grid with AFS, refined with M points "
             f"per interval): RMSE to converged samples (seeds 0-{s['rmse_seeds'] - 1}), FID on {s['images']} images. "
             "Target: the best untrained configuration that the student at that NFE must beat "
             "(`results/sfd.json`, by RMSE / by FID; unpaired here).", ""]
    lines += [f"The converged samples themselves (Heun NFE 160, the RMSE reference) have FID "
              f"**{report['converged_fid']:.3f}** on these images: a student that followed the ODE exactly.", ""]

    def below(nfe: int, rmse: float, fid: float) -> str:
        goal = targets.get(str(nfe))
        if not goal:
            return "-"
        return (f"RMSE {'yes' if rmse < goal['by_rmse']['rmse'] else 'no'} ({goal['by_rmse']['rmse']:.4f}), "
                f"FID {'yes' if fid < goal['by_fid']['fid'] else 'no'} ({goal['by_fid']['fid']:.3f})")

    table = [[row["candidate"], row["student_nfe"], row["teacher_nfe"], f"{row['rmse']:.4f}", f"{row['fid']:.3f}",
              below(row["student_nfe"], row["rmse"], row["fid"])] for row in report["rows"]]
    lines += [markdown_table(["student grid, teacher", "student NFE", "teacher NFE", "teacher RMSE", "teacher FID",
                              "below the target?"], table), ""]
    if report["students"]:
        table = [[r["student"], candidate_label(r["schedule"], r["schedule_options"], r["M"], (r["teacher"],)), r["nfe"],
                  f"{r['iters']} at lr {r['lr']:g}, {r['train_seconds'] / 60:.0f} min", f"{r['rmse']:.4f}",
                  f"{r['fid']:.3f}", below(r["nfe"], r["rmse"], r["fid"])] for r in report["students"]]
        lines += ["## Students", "", "Distilled with `diffsampler distill --nfe 2` and the grid options shown (minutes as "
                  "recorded: two runs shared the 2 cores at times).", "",
                  markdown_table(["student", "grid, teacher", "NFE", "iterations", "RMSE", "FID", "below the target?"],
                                 table), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
