"""GITS against the usual schedules: endpoint error (analytic models), FID (bundled model), search cost.

For euler, ipndm, dpmpp and unipc at NFE 3..10, each solver's default schedule is compared with a
GITS schedule tuned for that solver and NFE (teacher iPNDM on 61 points of polynomial rho=7,
warm-up seeds 100000.., coefficient 1.15, metric l2).  Evaluation seeds (0..N-1) never overlap
the warm-up seeds.

* Endpoint error (``--models``, default the digits optimal denoiser and a 3072-dim synthetic
  mixture): mean per-seed RMSE to the exact ODE endpoint (reference endpoints shared with
  ``endpoint_error.py``'s cache).
* FID (``--fid``): on the bundled Fashion-MNIST model, class labels per seed, with the bundled
  classifier extractor against the committed reference statistics.
* Search cost: wall time of the whole GITS search on the bundled model for 256 warm-up seeds,
  split into teacher sampling, cost matrix and DP, and the DP alone for a 61-point teacher.

    python evaluation/gits_benchmark.py                       # analytic models
    python evaluation/gits_benchmark.py --skip-endpoint --fid --cost     # bundled model parts (after fid_benchmark.py)
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import diffsampler
from diffsampler import gits, sample
from diffsampler.models.specs import load_model
from diffsampler.seeds import seed_noise

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from endpoint_error import reference  # noqa: E402  (shared cached ground truth)

SOLVERS = ("euler", "ipndm", "dpmpp", "unipc")
NFES = tuple(range(3, 11))
WARMUP_FIRST_SEED = 100_000


def warm(model, warmup, cond=None, dtype=torch.float64):
    """One teacher warm-up per model; each solver/NFE schedule is a DP on its cost matrix."""
    return gits.warm_up(model, model.shape, warmup=warmup, first_seed=WARMUP_FIRST_SEED, dtype=dtype, cond=cond)


def endpoint_section(spec, seeds, warmup, log):
    model = load_model(spec)
    ref, _ = reference(model, spec, seeds, 1e-9, 64, HERE / ".cache")
    noise = seed_noise(range(seeds), model.shape, dtype=torch.float64)
    rows, warmed = {}, warm(model, warmup)
    for solver in SOLVERS:
        for nfe in NFES:
            base = sample(model, noise, solver=solver, nfe=nfe).samples
            schedule = warmed.schedule(nfe, solver)
            mine = sample(model, noise, solver=solver, schedule=schedule).samples
            rmse = lambda out: float(((out - ref) ** 2).flatten(1).mean(1).sqrt().mean())
            rows.setdefault(solver, {})[nfe] = {"base": rmse(base), "gits": rmse(mine),
                                                "sigmas": [float(s) for s in schedule.sigmas]}
            log(f"{spec} {solver} NFE {nfe}: base {rows[solver][nfe]['base']:.4f}  gits {rows[solver][nfe]['gits']:.4f}")
    return rows


def fid_section(images, warmup, log):
    from bundled import bundled_model, labels_cond, score
    model = bundled_model()
    rows = {"heun_nfe35": score(model, images, solver="heun", nfe=34)["fid"]}
    log(f"FID heun NFE 34: {rows['heun_nfe35']:.3f}")
    warmed = warm(model, warmup, labels_cond(model), dtype=torch.float32)
    base_scores = _base_scores(images)
    for solver in SOLVERS:
        for nfe in NFES:
            base = base_scores.get((solver, nfe))
            if base is None:
                base = score(model, images, solver=solver, nfe=nfe)["fid"]
            tuned = score(model, images, solver=solver, schedule=warmed.schedule(nfe, solver))["fid"]
            rows.setdefault(solver, {})[nfe] = {"base": base, "gits": tuned}
            log(f"FID {solver} NFE {nfe}: base {base:.3f}  gits {tuned:.3f}")
    return rows


def _base_scores(images):
    """Default-schedule FIDs already recorded by fid_benchmark.py with the same images, if any."""
    path = HERE / "results" / "fid.json"
    if not path.exists() or json.loads(path.read_text()).get("images") != images:
        return {}
    rows = json.loads(path.read_text()).get("rows", [])
    return {(r["solver"], r["nfe"]): r["fid"] for r in rows if not r.get("afs") and r.get("schedule") == "default"}


def cost_section(log):
    from bundled import bundled_model, labels_cond
    model = bundled_model()
    start = time.perf_counter()
    schedule = gits.optimize_schedule(model, model.shape, nfe=5, solver="ipndm", warmup=256, batch=128,
                                      first_seed=WARMUP_FIRST_SEED, cond=labels_cond(model))
    total = time.perf_counter() - start
    cost = torch.rand(61, 61, dtype=torch.float64).triu(1)
    dp_times = []
    for _ in range(20):
        t0 = time.perf_counter()
        gits.dp_schedule(cost, 5)
        dp_times.append(time.perf_counter() - t0)
    out = {"total_s": total, **schedule.info["timings"], "dp_61_points_median_ms": 1000 * float(np.median(dp_times)),
           "threads": torch.get_num_threads()}
    log(f"search cost: {out}")
    return out


def markdown(report):
    lines = ["# GITS vs the usual schedules", "", f"Recorded {report['date']} on {report['machine']}.", ""]
    for spec, rows in report.get("endpoint_error", {}).items():
        lines += [f"## Endpoint error (RMSE to the exact endpoint), {spec}", "",
                  "| solver | schedule | " + " | ".join(f"NFE {n}" for n in NFES) + " |",
                  "|---|---|" + "---|" * len(NFES)]
        for solver, per in rows.items():
            for kind in ("base", "gits"):
                label = "default" if kind == "base" else "GITS"
                cells = []
                for n in NFES:
                    value = per[str(n)][kind] if str(n) in per else per[n][kind]
                    other = (per[str(n)] if str(n) in per else per[n])["gits" if kind == "base" else "base"]
                    cells.append(f"**{value:.4f}**" if value <= other else f"{value:.4f}")
                lines.append(f"| {solver} | {label} | " + " | ".join(cells) + " |")
        lines.append("")
    if "fid" in report:
        fid_rows = report["fid"]
        lines += ["## FID on the bundled model (bundled classifier features)", "",
                  f"Heun NFE 34 reference point: {fid_rows['heun_nfe35']:.3f}", "",
                  "| solver | schedule | " + " | ".join(f"NFE {n}" for n in NFES) + " |",
                  "|---|---|" + "---|" * len(NFES)]
        for solver in SOLVERS:
            per = fid_rows[solver]
            for kind in ("base", "gits"):
                cells = [f"{(per[str(n)] if str(n) in per else per[n])[kind]:.3f}" for n in NFES]
                lines.append(f"| {solver} | {'default' if kind == 'base' else 'GITS'} | " + " | ".join(cells) + " |")
        lines.append("")
    if "search_cost" in report:
        c = report["search_cost"]
        lines += ["## Search cost (bundled model, 256 warm-up seeds, NFE 5, this CPU)", "",
                  f"whole search {c['total_s']:.1f} s = teacher {c['teacher_s']:.1f} s + cost matrix "
                  f"{c['cost_matrix_s']:.2f} s + DP {1000 * c['dp_s']:.2f} ms; DP alone for a 61-point teacher: "
                  f"{c['dp_61_points_median_ms']:.2f} ms (median of 20).", ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gmm:digits,gmm:synthetic:16:3x32x32:0")
    parser.add_argument("--seeds", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=256)
    parser.add_argument("--fid", action="store_true")
    parser.add_argument("--fid-images", type=int, default=500)
    parser.add_argument("--cost", action="store_true")
    parser.add_argument("--skip-endpoint", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gits.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    report.update({"date": _dt.date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
                   f"{torch.get_num_threads()} thread(s), torch {torch.__version__}",
                   "diffsampler_version": diffsampler.__version__, "warmup": args.warmup, "seeds": args.seeds})
    log = lambda msg: print(msg, flush=True)
    if not args.skip_endpoint:
        report["endpoint_error"] = {spec: endpoint_section(spec, args.seeds, args.warmup, log)
                                    for spec in args.models.split(",")}
    if args.fid:
        report["fid"] = fid_section(args.fid_images, args.warmup, log)
        report["fid_images"] = args.fid_images
    if args.cost:
        report["search_cost"] = cost_section(log)
    path.write_text(json.dumps(report, indent=1))
    (out / "gits.md").write_text(markdown(json.loads(path.read_text())))
    print(f"wrote {path} and {out / 'gits.md'}")


if __name__ == "__main__":
    main()
