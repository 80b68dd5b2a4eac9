"""SFD-v on the bundled model: the distilled student at NFE 2-5 against the best untrained solver
configurations, by paired FID (bundled classifier) and RMSE to converged samples.

    python -m evaluation.sfd_benchmark                       # the recorded run (results/sfd.json, .md)
    python -m evaluation.sfd_benchmark --images 200 --rmse-seeds 32 --screen 100 --out /tmp/sfd   # a quick look

What it measures (student: ``--student``, by default the committed ``fashion-mnist-sfd``; model: the
one the student was distilled from, as its config records it, or ``--teacher``; every image has its
seed's noise and a random class per seed, as ``diffsampler sample`` draws them):

* **RMSE to converged samples**: per seed, the pixel RMSE between a configuration's sample and the
  teacher's converged sample of the same seed and label (Heun NFE 160, ``common.converged``), mean
  over seeds 0..``--rmse-seeds``-1.
* **FID**: bundled-classifier features of seeds 0..``--images``-1 against the training-set statistics;
  differences between two configurations are paired (the same seeds; ``common.paired_fid_difference``:
  mean and std over paired bootstrap resamples and the fraction of resamples where the first is lower).
* **The untrained sweep**: every registered solver x {polynomial rho 7, logsnr, time_uniform rho 2} x
  {AFS off, on} at every NFE of ``--sweep-nfes`` it can make (RMSE for all of them).  At the target
  NFEs (5 and 8) FID is screened on ``--screen`` images for every configuration, and the ``--top``
  best by screened FID and the ``--top`` best by RMSE get the full ``--images`` FID; the best by RMSE
  and the best by full FID are the baselines the student is compared with.
* **Targets** (issue 15): the student at NFE 2 below the best untrained configuration at NFE 5, and at
  NFE 3 and 4 below the best at NFE 8, on each metric.
* **The teacher**: at each student NFE, the solve the student was distilled to imitate (the recorded
  teacher solver on the student's grid with M points inside every interval, on the teacher model),
  with the same RMSE and FID: the student's ceiling.  student - teacher is what distillation lost;
  teacher - converged is what the short teacher grid loses.
* **Learned samplers**: the rows of the AMED reports (``AMED_REPORTS``) and of the newest
  learned-sampler report (``LEARNED_REPORTS``) recorded on the teacher's weights, at the student's
  NFEs, as recorded (their own image counts).

Rows are cached in ``evaluation/.cache/sfd/`` (a rerun with the same settings reuses them).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import torch

from diffsampler import SOLVERS, sample
from diffsampler.distill.train import teacher_grid
from diffsampler.models.identity import weights_hash
from diffsampler.plan import make_plan, solver_record
from diffsampler.seeds import seed_noise
from diffsampler.solvers import get_solver

from evaluation.common import (CACHE, RESULTS, _cached, converged, features, fid_of, labels_cond, load_model,
                               machine, markdown_table, paired_fid_difference, rmse_per_seed, write_report)

SCHEDULES = {"polynomial": {"rho": 7.0}, "logsnr": {}, "time_uniform": {"rho": 2.0}}
TARGETS = {2: 5, 3: 8, 4: 8}            # student NFE -> the NFE of the untrained configuration it should beat


def configurations(nfe: int) -> List[dict]:
    """Every registered solver x schedule x AFS that makes exactly ``nfe`` evaluations."""
    out = []
    for name in SOLVERS:
        for afs in (False, True):
            if nfe not in get_solver(name).valid_nfes(afs):
                continue
            for schedule, options in SCHEDULES.items():
                out.append({"solver": name, "nfe": nfe, "schedule": schedule, "schedule_options": dict(options),
                            "afs": afs})
    return out


def teacher_configuration(distilled: dict, k: int) -> dict:
    """The teacher solve behind the student's NFE-``k`` plan, as its distillation record gives it."""
    options = {key: value for key, value in distilled["teacher"].items() if key != "name"}
    sigmas = teacher_grid(distilled["sigmas"][str(k)], distilled["M"], distilled["schedule"],
                          distilled["schedule_options"])
    nfe = make_plan(distilled["teacher"]["name"], sigmas=sigmas, afs=False, **options).nfe
    return {"teacher_of": k, "solver": distilled["teacher"]["name"], "solver_options": options,
            "sigmas": sigmas, "afs": False, "nfe": nfe}


def label(config: dict) -> str:
    if "student" in config:
        return f"SFD-v student, NFE {config['nfe']}"
    if "teacher_of" in config:
        return f"its teacher for NFE {config['teacher_of']}: {config['solver']}, NFE {config['nfe']}"
    rho = config["schedule_options"].get("rho")
    grid = config["schedule"] + (f" rho {rho:g}" if rho is not None else "")
    return f"{config['solver']}, {grid}{', AFS' if config['afs'] else ''}"


def kwargs_of(config: dict) -> dict:
    if "student" in config:
        return {"nfe": config["nfe"]}
    if "teacher_of" in config:
        return {"solver": config["solver"], "sigmas": config["sigmas"], "afs": False, **config["solver_options"]}
    return {k: config[k] for k in ("solver", "nfe", "schedule", "schedule_options", "afs")}


class Bench:
    """Samples, RMSEs and features of configurations, cached per configuration and setting."""

    def __init__(self, teacher, student, student_name: str, rmse_seeds: int, log):
        self.teacher, self.student, self.student_name, self.log = teacher, student, student_name, log
        self.rmse_seeds = rmse_seeds
        self.cond = labels_cond(teacher)
        self.reference = converged(teacher, rmse_seeds)
        self.folder = CACHE / "sfd"

    def model_of(self, config):
        return self.student if "student" in config else self.teacher

    def key(self, config, what, count):
        key = {"config": config, "what": what, "count": count,
               "weights": weights_hash(self.model_of(config)), "reference_seeds": self.rmse_seeds}
        if "student" not in config and "teacher_of" not in config:   # the solver's options as resolved today
            key["solver"] = solver_record(get_solver(config["solver"]))
        return key

    def rmse(self, config) -> float:
        def compute():
            parts = []
            for k in range(0, self.rmse_seeds, 128):
                seeds = list(range(k, min(self.rmse_seeds, k + 128)))
                out = sample(self.model_of(config), seed_noise(seeds, self.teacher.shape),
                             cond=self.cond(seeds) if self.cond else None, **kwargs_of(config))
                assert out.nfe == config["nfe"], (config, out.nfe)
                parts.append(out.samples.double())
            return float(rmse_per_seed(torch.cat(parts), self.reference).mean())
        name = f"rmse_{_slug(config)}_{self.rmse_seeds}.pt"
        return _cached(self.folder / name, self.key(config, "rmse", self.rmse_seeds), compute)

    def features(self, config, images: int):
        def compute():
            t0 = time.perf_counter()
            feats, seconds, nfe = features(self.model_of(config), images, **kwargs_of(config))
            assert nfe == config["nfe"], (config, nfe)
            return {"features": feats, "sample_seconds": seconds, "seconds": time.perf_counter() - t0}
        name = f"features_{_slug(config)}_{images}.pt"
        return _cached(self.folder / name, self.key(config, "features", images), compute)


def _slug(config: dict) -> str:
    """A file name per configuration (students and teachers with a digest of their record: two
    students, or teachers on two grids, at one NFE must not overwrite each other's cache)."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
    if "student" in config:
        return f"student{config['nfe']}_{digest}"
    if "teacher_of" in config:
        return f"teacher{config['teacher_of']}_{config['solver']}_nfe{config['nfe']}_{digest}"
    opts = "-".join(f"{k}{v:g}" for k, v in config["schedule_options"].items())
    return f"{config['solver']}_nfe{config['nfe']}_{config['schedule']}{opts}_{'afs' if config['afs'] else 'noafs'}"


LEARNED_REPORTS = ("learned.json", "retrained/learned.json", "finetuned/learned.json")
AMED_REPORTS = ("amed.json", "finetuned/amed.json")


def learned_rows(nfes, weights: str) -> List[dict]:
    """The learned samplers recorded on the bundled model at these NFEs, as recorded: AMED's rows of
    the AMED reports (``AMED_REPORTS``; 500 images, 256 seeds) and every method of the learned-sampler reports
    (``LEARNED_REPORTS``; the other issue's benchmark: RMSE on its own test seeds, paired FID of its
    best); only rows recorded on the teacher's ``weights`` (other weights' rows do not compare), and of
    those only the first such learned-sampler report (``LEARNED_REPORTS`` is newest first: an older
    report on the same weights was trained with older defaults and would mix the two)."""
    rows = []
    for name in AMED_REPORTS:
        amed = RESULTS / name
        report = json.loads(amed.read_text()) if amed.is_file() else {}
        if report.get("bundled_weights") != weights:
            continue
        for method, per in report.get("bundled", {}).items():
            if not method.startswith("amed"):
                continue
            for nfe, row in per.items():
                if int(nfe) in nfes:
                    rows.append({"source": f"{name} (FID on {report.get('images')} images)", "method": method,
                                 "nfe": int(nfe), "fid": row.get("fid"), "rmse": row.get("rmse")})
    for name in LEARNED_REPORTS:
        learned = RESULTS / name
        info = json.loads(learned.read_text()).get("models", {}).get("fashion-mnist", {}) if learned.is_file() else {}
        if info.get("weights") != weights:
            continue
        fids = info.get("fid") or {}
        for nfe, entry in (info.get("per_nfe") or {}).items():
            if int(nfe) not in nfes:
                continue
            for method, row in (entry.get("learned") or {}).items():
                if row.get("same_as") or any(r["nfe"] == int(nfe) and r["rmse"] == row.get("rmse") for r in rows):
                    continue                               # the default run under another name
                fid = fids.get(nfe, {})
                measured = str(fid.get("learned", "")).rsplit(" @ ", 1)[0] == method
                rows.append({"source": f"{name} (RMSE on {info.get('seeds')} seeds)", "method": method,
                             "nfe": int(nfe), "rmse": row.get("rmse"),
                             "fid": fid.get("fid_learned") if measured else None})
        break
    return rows


def main(argv: Optional[List[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", default="fashion-mnist-sfd", help="the student's model spec (or folder)")
    p.add_argument("--teacher", default=None,
                   help="the model the untrained rows sample (default: the one the student was distilled from)")
    p.add_argument("--images", type=int, default=2000, help="FID images (seeds 0..N-1)")
    p.add_argument("--rmse-seeds", type=int, default=256)
    p.add_argument("--screen", type=int, default=500, help="FID images of the screening pass of the sweep")
    p.add_argument("--top", type=int, default=3, help="configurations per ranking that get the full FID")
    p.add_argument("--sweep-nfes", default="2,3,4,5,8")
    p.add_argument("--target-nfes", default="5,8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--sweep-only", action="store_true",
                   help="only the untrained sweep (fills the cache; needs no student), no report")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".* makes 2 evaluations per step")   # the sweep runs them on purpose
    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    student = None if args.sweep_only else load_model(args.student)
    teacher = load_model(args.teacher or (student.info.get("model") if student else None) or "fashion-mnist")
    nfes = [] if args.sweep_only else student.nfes
    bench = Bench(teacher, student, args.student, args.rmse_seeds, log)
    log(f"converged references ready ({args.rmse_seeds} seeds)")
    report = {"machine": machine(), "settings": vars(args) | {"out": str(args.out)},
              "student": {"spec": args.student, "distilled": {k: v for k, v in student.info.items()
                                                              if k not in ("losses",)} if student else None}}

    # --- the student -------------------------------------------------------------------------------
    student_rows = {}
    for k in nfes:
        config = {"student": args.student, "nfe": k}
        f = bench.features(config, args.images)
        student_rows[k] = {"config": config, "label": label(config), "rmse": bench.rmse(config),
                           "fid": fid_of(f["features"]), "images_per_s": args.images / f["sample_seconds"]}
        log(f"{label(config)}: RMSE {student_rows[k]['rmse']:.4f}, FID {student_rows[k]['fid']:.3f}")
    report["student_rows"] = {str(k): {kk: vv for kk, vv in v.items()} for k, v in student_rows.items()}
    teacher_rows = {}
    for k in nfes:
        config = teacher_configuration(student.info, k)
        teacher_rows[str(k)] = {"config": config, "label": label(config), "rmse": bench.rmse(config),
                                "fid": fid_of(bench.features(config, args.images)["features"])}
        log(f"{label(config)}: RMSE {teacher_rows[str(k)]['rmse']:.4f}, FID {teacher_rows[str(k)]['fid']:.3f}")
    report["teacher_rows"] = teacher_rows

    # --- the untrained sweep: RMSE everywhere, FID screened at the target NFEs ------------------------
    sweep = {}
    for nfe in [int(v) for v in args.sweep_nfes.split(",")]:
        rows = []
        for config in configurations(nfe):
            rows.append({"config": config, "label": label(config), "rmse": bench.rmse(config),
                         "solver": solver_record(get_solver(config["solver"]))})
        sweep[nfe] = rows
        best = min(rows, key=lambda r: r["rmse"])
        log(f"NFE {nfe}: {len(rows)} configurations, best RMSE {best['rmse']:.4f} ({best['label']})")
    baselines = {}
    for nfe in [int(v) for v in args.target_nfes.split(",")]:
        rows = sweep[nfe]
        for row in rows:
            row["fid_screen"] = fid_of(bench.features(row["config"], args.screen)["features"])
        by_screen = sorted(rows, key=lambda r: r["fid_screen"])[: args.top]
        by_rmse = sorted(rows, key=lambda r: r["rmse"])[: args.top]
        for row in {id(r): r for r in by_screen + by_rmse}.values():
            row["fid"] = fid_of(bench.features(row["config"], args.images)["features"])
        full = [r for r in rows if "fid" in r]
        baselines[nfe] = {"by_rmse": min(rows, key=lambda r: r["rmse"]), "by_fid": min(full, key=lambda r: r["fid"])}
        log(f"NFE {nfe}: best by RMSE {baselines[nfe]['by_rmse']['label']} ({baselines[nfe]['by_rmse']['rmse']:.4f}), "
            f"best by FID {baselines[nfe]['by_fid']['label']} ({baselines[nfe]['by_fid']['fid']:.3f})")
    if args.sweep_only:
        log("sweep cached")
        return report
    report["sweep"] = {str(k): v for k, v in sweep.items()}
    report["baselines"] = {str(k): v for k, v in baselines.items()}

    # --- the targets: paired FID differences and RMSE ------------------------------------------------
    targets = []
    for k, base_nfe in TARGETS.items():
        if k not in student_rows or base_nfe not in baselines:
            continue
        ours = bench.features(student_rows[k]["config"], args.images)["features"]
        for ranking in ("by_rmse", "by_fid"):
            base = baselines[base_nfe][ranking]
            theirs = bench.features(base["config"], args.images)["features"]
            diff = paired_fid_difference(ours, theirs)
            targets.append({"student_nfe": k, "base_nfe": base_nfe, "ranking": ranking, "base": base["label"],
                            "rmse_student": student_rows[k]["rmse"], "rmse_base": base["rmse"],
                            "rmse_met": student_rows[k]["rmse"] < base["rmse"],
                            "fid_student": student_rows[k]["fid"], "fid_base": base["fid"], "fid_diff": diff,
                            "fid_met": student_rows[k]["fid"] < base["fid"]})
    report["targets"] = targets
    same_nfe = {k: min(sweep[k], key=lambda r: r["rmse"]) for k in nfes if k in sweep}
    report["same_nfe_best_rmse"] = {str(k): v for k, v in same_nfe.items()}
    report["learned"] = learned_rows(set(nfes), weights_hash(teacher))
    report["seconds"] = time.perf_counter() - t_start
    write_report("sfd", report, markdown(report), folder=args.out)
    log(f"wrote {args.out / 'sfd.json'} and sfd.md")
    return report


def markdown(report: dict) -> str:
    d = report["student"]["distilled"]
    s = report["settings"]
    lines = [
        "# SFD-v on the bundled Fashion-MNIST model", "",
        f"`python -m evaluation.sfd_benchmark` on {report['machine']['cpu']} ({report['machine']['threads']} threads, "
        f"load average {', '.join(f'{v:.1f}' for v in report['machine']['load_average'])} at the start), "
        f"{report['machine']['date']}; this invocation {report['seconds'] / 60:.0f} min (work read from "
        f"`evaluation/.cache/`, such as a sweep cached by `--sweep-only`, is not counted).", "",
        f"Student `{s['student']}`: {d['method']} for NFE {', '.join(map(str, d['nfes']))}, distilled in "
        f"**{d['train_seconds'] / 60:.1f} min** ({d['iters']} iterations of batch {d['batch']}, "
        f"{d.get('processes', 1)} process x {d.get('threads', '?')} threads, {d.get('machine', '?')}).", "",
        f"RMSE: to converged samples (Heun NFE 160) of seeds 0-{s['rmse_seeds'] - 1}. FID: bundled classifier, "
        f"seeds 0-{s['images'] - 1}, a random class per seed; differences paired (same seeds, 200 bootstrap "
        "resamples: mean +- std, and how often the student is lower).", "",
        "## Targets", "",
    ]
    rows = []
    for t in report["targets"]:
        diff = t["fid_diff"]
        rows.append([f"NFE {t['student_nfe']}", f"NFE {t['base_nfe']}: {t['base']} (best by "
                     f"{'RMSE' if t['ranking'] == 'by_rmse' else 'FID'})",
                     f"{t['rmse_student']:.4f} vs {t['rmse_base']:.4f} ({'met' if t['rmse_met'] else 'not met'})",
                     f"{t['fid_student']:.3f} vs {t['fid_base']:.3f} ({'met' if t['fid_met'] else 'not met'}; "
                     f"{diff['mean']:+.3f} +- {diff['std']:.3f}, lower in {diff['p_lower']:.0%})"])
    lines += [markdown_table(["student", "against", "RMSE", "FID"], rows), "", "## The student and the best untrained "
              "configuration at the same NFE", ""]
    rows = []
    for k, r in report["student_rows"].items():
        best = report["same_nfe_best_rmse"].get(k)
        teacher = report.get("teacher_rows", {}).get(k)
        rows.append([k, f"{r['rmse']:.4f}", f"{r['fid']:.3f}", f"{r['images_per_s']:.0f}",
                     f"{best['label']}: {best['rmse']:.4f}" if best else "-",
                     f"NFE {teacher['config']['nfe']}: {teacher['rmse']:.4f} / {teacher['fid']:.3f}" if teacher else "-"])
    lines += [markdown_table(["NFE", "student RMSE", f"student FID ({s['images']})", "images/s",
                              "best untrained by RMSE", "its teacher: RMSE / FID"], rows), "",
              "The teacher column is the solve the student imitates (the student's ceiling): student minus "
              "teacher is what distillation lost; the teacher's own RMSE is what its short grid loses against the converged "
              "samples.", ""]
    for nfe, b in report["baselines"].items():
        lines += [f"## Untrained configurations at NFE {nfe}", "",
                  f"RMSE for all, FID screened on {s['screen']} images, full FID for the {s['top']} best of each "
                  "ranking (sorted by RMSE; first 12 shown, all in sfd.json).", ""]
        rows = sorted(report["sweep"][nfe], key=lambda r: r["rmse"])[:12]
        lines += [markdown_table(["configuration", "RMSE", f"FID ({s['screen']})", f"FID ({s['images']})"],
                                 [[r["label"], f"{r['rmse']:.4f}", f"{r.get('fid_screen', float('nan')):.3f}",
                                   f"{r['fid']:.3f}" if "fid" in r else "-"] for r in rows]), ""]
    if report["learned"]:
        best = []
        for nfe in sorted({r["nfe"] for r in report["learned"]}):
            here = [r for r in report["learned"] if r["nfe"] == nfe and r.get("rmse") is not None]
            best += sorted(here, key=lambda r: r["rmse"])[:3]
        lines += ["## Learned samplers at the same NFE (the three best by RMSE; their benchmarks' own settings)", "",
                  markdown_table(["NFE", "method", "RMSE", "FID", "source"],
                                 [[r["nfe"], r["method"], _num(r.get("rmse"), 4), _num(r.get("fid"), 3), r["source"]]
                                  for r in best]), ""]
    return "\n".join(lines) + "\n"


def _num(value, digits):
    return "-" if value is None else f"{value:.{digits}f}"


if __name__ == "__main__":
    main()
