"""GITS against the usual schedules: endpoint error (analytic models), accuracy and FID (bundled model), search cost.

Evaluation seeds (0..N-1) never overlap the warm-up seeds (100000..).  The teacher is iPNDM on 61
points of polynomial rho=7.

* Endpoint error (default section; ``--models``, default the digits and Fashion-MNIST optimal
  denoisers and a 3072-dim synthetic mixture; with an empty reference cache about 10 min for the
  first two and 70 min for Fashion-MNIST with ``--threads 2``, 24 of them its exact endpoints): for euler, ipndm, dpmpp and unipc at NFE 3..10, mean per-seed RMSE
  to the exact ODE endpoint of the polynomial (rho=7) and logSNR grids and of GITS grids for each
  ``--endpoint-settings`` metric:coefficient pair (default: the package's dev 1.15, then l2 1.15,
  dev 1.05, l2 1.0; reference endpoints shared with ``endpoint_error.py``'s cache).
* RMSE to converged samples (``--converged``) on the bundled Fashion-MNIST model: seeds 0..199
  with their class labels, against ipndm at NFE 200 of the same noise and label (cached under
  ``.cache``, checked against NFE 100); ipndm and euler, default schedule vs GITS for each
  ``--converged-settings`` metric:coefficient pair.  Not dominated by FID's sampling noise.
* FID (``--fid``) on the bundled model with the bundled classifier extractor against the
  committed reference statistics: ``--fid-solvers`` (default ipndm) at ``--fid-nfes`` (4-10),
  default schedule vs GITS (``--fid-settings``), ``--fid-images`` (2000) images,
  the same seeds for every row, with a paired bootstrap of the FID difference and the FIDs of
  disjoint 400-image slices (how noisy a small-sample FID is).
* Search cost (``--cost``): wall time of the whole GITS search on the bundled model for 256
  warm-up seeds (teacher, cost matrix, DP) with 1 and 2 threads and teacher batch 128 / 256, with
  the load average around each run (the CPU is shared).

The bundled-model sections share one teacher run per metric set (cached in ``.cache``).  FID runs
of the same images accumulate in the report; runs made in parallel with their own ``--out`` fold in
with ``--merge`` (FID runs, ``--converged`` and ``--cost`` sections; never from other weights).

    python -m evaluation.gits_benchmark                       # analytic models
    python -m evaluation.gits_benchmark --skip-endpoint --converged --fid --cost     # bundled model parts
    python -m evaluation.gits_benchmark --skip-endpoint --fid --fid-solvers euler --fid-nfes 3-10 --out /tmp/e &
    python -m evaluation.gits_benchmark --skip-endpoint --fid --fid-solvers dpmpp --fid-nfes 3-10 --out /tmp/d
    python -m evaluation.gits_benchmark --skip-endpoint --merge /tmp/e/gits.json /tmp/d/gits.json
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

import diffsampler
from diffsampler import gits, sample
from diffsampler.fileio import write_atomic
from diffsampler.models.base import sigma_range
from diffsampler.models.identity import weights_hash
from diffsampler.models.specs import load_model
from diffsampler.schedules import polynomial
from diffsampler.seeds import parse_ranges, seed_noise

from evaluation.common import (HERE, bundled_model, converged, drop_stale_bundled, exact_endpoints, features, fid_of,
                               labels_cond, paired_fid_difference, rmse_per_seed)

SOLVERS = ("euler", "ipndm", "dpmpp", "unipc")
NFES = tuple(range(3, 11))
WARMUP_FIRST_SEED = 100_000
CONVERGED_NFE = 200
CACHE = HERE / ".cache"


BASES = ("polynomial", "logsnr")


def endpoint_section(spec, seeds, warmup, settings, log):
    """Mean per-seed RMSE to the exact endpoint: polynomial and logSNR grids vs GITS (metric:coeff) grids."""
    model = load_model(spec)
    ref, _ = exact_endpoints(model, spec, 0, seeds)
    noise = seed_noise(range(seeds), model.shape, dtype=torch.float64)
    warmed = gits.warm_ups(model, model.shape, metrics=sorted({m for m, _ in settings}), warmup=warmup,
                           first_seed=WARMUP_FIRST_SEED, dtype=torch.float64)     # one teacher run for all
    rmse = lambda **kw: float(rmse_per_seed(sample(model, noise, **kw).samples, ref).mean())
    rows = {}
    for solver in SOLVERS:
        for nfe in NFES:
            row = {"rmse": {base: rmse(solver=solver, nfe=nfe, schedule=base) for base in BASES}, "sigmas": {}}
            for metric, coeff in settings:
                label = f"GITS {metric} {coeff:g}"
                schedule = warmed[metric].schedule(nfe, solver, coeff=coeff)
                row["rmse"][label] = rmse(solver=solver, schedule=schedule)
                row["sigmas"][label] = [float(s) for s in schedule.sigmas]
            rows.setdefault(solver, {})[nfe] = row
            log(f"{spec} {solver} NFE {nfe}: " + "  ".join(f"{k} {v:.4f}" for k, v in row["rmse"].items()))
    return {"settings": [list(x) for x in settings], "rows": rows}


def _parse_settings(text):
    """'dev:1.0,l2:1.15' -> [('dev', 1.0), ('l2', 1.15)]."""
    out = []
    for item in text.split(","):
        metric, coeff = item.split(":")
        out.append((metric.strip(), float(coeff)))
    return out


def bundled_warm_ups(model, cond, warmup, metrics, log, batch=128):
    """``gits.warm_ups`` on the warm-up seeds with their labels (teacher iPNDM on 61 points of
    polynomial rho=7), its cost matrices cached under .cache; returns {metric: gits.WarmUp}."""
    path = CACHE / f"gits_costs_fashion-mnist_warmup{warmup}_from{WARMUP_FIRST_SEED}.pt"
    saved = torch.load(path) if path.exists() else {"costs": {}}
    weights = weights_hash(model)
    if saved.get("weights") != weights:                        # made on other weights: recompute
        saved = {"costs": {}, "weights": weights}
    missing = [m for m in metrics if m not in saved["costs"]]
    lo, hi = sigma_range(model)
    grid = polynomial(60, lo, hi)
    if missing:
        warmed = gits.warm_ups(model, model.shape, metrics=missing, warmup=warmup, first_seed=WARMUP_FIRST_SEED,
                               batch=batch, cond=cond)
        for m in missing:
            assert torch.equal(warmed[m].grid, grid)
            saved["costs"][m] = warmed[m].cost
        CACHE.mkdir(exist_ok=True)
        torch.save(saved, path)
        log(f"teacher + cost matrices ({', '.join(missing)}) cached in {path}")
    settings = {"model": "fashion-mnist", "teacher": "ipndm", "teacher_steps": 60, "warmup": warmup}
    return {m: gits.WarmUp(grid, saved["costs"][m], {**settings, "metric": m}, {}, []) for m in metrics}


def converged_reference(model, seeds, log):
    """ipndm at NFE 200 (polynomial rho=7) for seeds 0..seeds-1, checked against NFE 100 (cached)."""
    ref, half = (converged(model, seeds, "ipndm", nfe) for nfe in (CONVERGED_NFE, CONVERGED_NFE // 2))
    check = float(rmse_per_seed(half, ref).max())
    log(f"converged reference: ipndm NFE {CONVERGED_NFE} vs {CONVERGED_NFE // 2}: max per-seed RMSE {check:.2e}")
    return ref, check


def converged_section(seeds, warmup, settings, log):
    """Mean per-seed RMSE to a converged sample of the same noise and label: default vs GITS schedules."""
    model = bundled_model()
    cond = labels_cond(model)
    ref, check = converged_reference(model, seeds, log)
    warmed = bundled_warm_ups(model, cond, warmup, sorted({m for m, _ in settings}), log)
    noise, c = seed_noise(range(seeds), model.shape), cond(list(range(seeds)))
    rmse = lambda **kw: float(rmse_per_seed(sample(model, noise, cond=c, **kw).samples, ref).mean())
    rows = {}
    for solver in ("ipndm", "euler"):
        per = rows.setdefault(solver, {"default": {}})
        for nfe in NFES:
            per["default"][nfe] = rmse(solver=solver, nfe=nfe)
        log(f"RMSE {solver} default: " + " ".join(f"{per['default'][n]:.4f}" for n in NFES))
        for metric, coeff in settings:
            label = f"GITS {metric} {coeff:g}"
            per[label] = {nfe: rmse(solver=solver, schedule=warmed[metric].schedule(nfe, solver, coeff=coeff))
                          for nfe in NFES}
            log(f"RMSE {solver} {label}: " + " ".join(f"{per[label][n]:.4f}" for n in NFES))
    return {"seeds": seeds, "reference": f"ipndm NFE {CONVERGED_NFE}", "reference_check_max_rmse": check,
            "rows": rows}


def fid_section(images, warmup, log, solvers=SOLVERS, nfes=NFES, settings=(("l2", 1.15),), subsets=400,
                bootstrap=200, first_seed=0):
    """FID (bundled classifier features) of each solver's default schedule and of GITS schedules.

    Same seeds for every configuration, so the paired bootstrap over images (same resampled
    indices for both) gives the spread of the FID *difference*; FIDs of disjoint ``subsets``-image
    slices show how noisy a small-sample FID is."""
    model = bundled_model()
    warmed = bundled_warm_ups(model, labels_cond(model), warmup, sorted({m for m, _ in settings}), log)
    rows = {}
    for solver in solvers:
        for nfe in nfes:
            feats = {"default": features(model, images, first_seed, solver=solver, nfe=nfe)[0]}
            for metric, coeff in settings:
                schedule = warmed[metric].schedule(nfe, solver, coeff=coeff)
                feats[f"GITS {metric} {coeff:g}"] = features(model, images, first_seed, solver=solver,
                                                             schedule=schedule)[0]
            row = {"fid": {k: fid_of(f) for k, f in feats.items()},
                   f"fid_{subsets}_slices": {k: [fid_of(f[a:a + subsets])
                                                 for a in range(0, images - subsets + 1, subsets)]
                                             for k, f in feats.items()}}
            row["diff_vs_default_bootstrap"] = {}
            for k, f in feats.items():
                if k == "default":
                    continue
                diff = paired_fid_difference(f, feats["default"], bootstrap)
                row["diff_vs_default_bootstrap"][k] = {"mean": diff["mean"], "std": diff["std"],
                                                        "p_gits_better": diff["p_lower"]}
            rows.setdefault(solver, {})[nfe] = row
            log(f"FID {solver} NFE {nfe}: " + "  ".join(f"{k} {v:.3f}" for k, v in row["fid"].items()) + "  diff "
                + "  ".join(f"{k} {v['mean']:+.3f}+-{v['std']:.3f}" for k, v in row["diff_vs_default_bootstrap"].items()))
    return {"images": images, "first_seed": first_seed, "warmup": warmup, "settings": [list(x) for x in settings],
            "rows": rows}


def cost_section(log, configs=((1, 128), (1, 256), (2, 256))):
    """Wall time of the whole search (NFE 5, 256 warm-up seeds) for (threads, teacher batch) settings.

    The machine is shared, so each run records the 1-minute load average before and after it."""
    model = bundled_model()
    runs = []
    for threads, batch in configs:
        torch.set_num_threads(threads)
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        schedule = gits.optimize_schedule(model, model.shape, nfe=5, solver="ipndm", warmup=256, batch=batch,
                                          first_seed=WARMUP_FIRST_SEED, cond=labels_cond(model))
        total = time.perf_counter() - start
        runs.append({"date": _dt.date.today().isoformat(), "threads": threads, "batch": batch, "total_s": total,
                     **schedule.info["timings"],
                     "metric": schedule.info["metric"], "load_before": load_before, "load_after": os.getloadavg()[0]})
        log(f"search cost: {runs[-1]}")
    torch.set_num_threads(1)                           # DP timing on one thread
    cost = torch.rand(61, 61, dtype=torch.float64).triu(1)
    dp_times = []
    for _ in range(20):
        t0 = time.perf_counter()
        gits.dp_schedule(cost, 5)
        dp_times.append(time.perf_counter() - t0)
    return {"runs": runs, "dp_61_points_median_ms": 1000 * float(np.median(dp_times)), "cpus": os.cpu_count()}


def markdown(report):
    lines = ["# GITS vs the usual schedules", "", f"Recorded {report['date']} on {report['machine']}.", ""]
    for spec, run in report.get("endpoint_error", {}).items():
        lines += [f"## Endpoint error (RMSE to the exact endpoint), {spec}", "",
                  f"Mean per-seed RMSE over {report['seeds']} seeds.  Bold: a GITS grid below both the "
                  "polynomial (rho=7) and the logSNR grid.", "",
                  "| solver | schedule | " + " | ".join(f"NFE {n}" for n in NFES) + " |",
                  "|---|---|" + "---|" * len(NFES)]
        for solver, per in run["rows"].items():
            for label in per[str(NFES[0])]["rmse"]:
                cells = []
                for n in NFES:
                    values = per[str(n)]["rmse"]
                    beats = label not in BASES and values[label] < min(values[b] for b in BASES)
                    cells.append(f"**{values[label]:.4f}**" if beats else f"{values[label]:.4f}")
                lines.append(f"| {solver} | {label} | " + " | ".join(cells) + " |")
        lines.append("")
    if "converged" in report:
        conv = report["converged"]
        lines += [f"## RMSE to converged samples on the bundled model ({conv['seeds']} seeds, mean per-seed RMSE)", "",
                  f"Reference: {conv['reference']} (polynomial rho=7) for the same noise and label; against NFE "
                  f"{CONVERGED_NFE // 2} its largest per-seed RMSE is {conv['reference_check_max_rmse']:.1e}. "
                  "Bold: below the default schedule.", "",
                  "| solver | schedule | " + " | ".join(f"NFE {n}" for n in NFES) + " |",
                  "|---|---|" + "---|" * len(NFES)]
        for solver, per in conv["rows"].items():
            base = per["default"]
            for label, values in per.items():
                cells = [f"{values[str(n)]:.4f}" if label == "default" or values[str(n)] >= base[str(n)]
                         else f"**{values[str(n)]:.4f}**" for n in NFES]
                lines.append(f"| {solver} | {label} | " + " | ".join(cells) + " |")
        lines.append("")
    for key in sorted(k for k in report if k.startswith("fid") and isinstance(report[k], dict) and "rows" in report[k]):
        lines += _fid_markdown(report[key])
    if "search_cost" in report and "runs" in report["search_cost"]:
        c = report["search_cost"]
        lines += [f"## Search cost (bundled model, 256 warm-up seeds, NFE 5, {c['cpus']}-core CPU shared with other work)", "",
                  "| date | threads | teacher batch | metric | whole search s | teacher s | cost matrix s | DP ms | load avg before/after |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in c["runs"]:
            lines.append(f"| {r.get('date', '2026-11')} | {r['threads']} | {r['batch']} | {r['metric']} | {r['total_s']:.1f} | {r['teacher_s']:.1f} | "
                         f"{r['cost_matrix_s']:.2f} | {1000 * r['dp_s']:.2f} | {r['load_before']:.1f} / {r['load_after']:.1f} |")
        lines += ["", f"DP alone for a 61-point teacher: {c['dp_61_points_median_ms']:.2f} ms (median of 20).", ""]
    return "\n".join(lines)


def _fid_markdown(fid_report):
    """One table per solver: every label measured at any NFE ('-' where a label was not run)."""
    lines, first = [], fid_report.get("first_seed", 0)
    for solver, per in fid_report.get("rows", {}).items():
        nfes = sorted(per, key=int)
        labels = list(dict.fromkeys(label for n in nfes for label in per[n]["fid"]))
        cell = lambda n, get: "-" if get(n) is None else get(n)
        lines += [f"## FID on the bundled model, {solver} ({fid_report['images']} images from seed {first}, "
                  "bundled classifier features)", "",
                  f"Seeds {first}..{first + fid_report['images'] - 1} for every row (paired).  `diff`: FID(GITS) - FID(default), mean +- std "
                  "over 200 paired bootstrap resamples of the images, and the fraction of resamples where GITS is "
                  "lower.  `400-image slices`: FID of disjoint 400-image slices (min-max), the noise of a "
                  "small-sample FID.", "",
                  "| schedule | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
        for label in labels:
            lines.append(f"| {label} | " + " | ".join(
                cell(n, lambda n: f"{per[n]['fid'][label]:.3f}" if label in per[n]["fid"] else None) for n in nfes) + " |")
        for label in labels[1:]:
            def diff(n):
                d = per[n]["diff_vs_default_bootstrap"].get(label)
                return None if d is None else f"{d['mean']:+.3f} +- {d['std']:.3f} ({d['p_gits_better']:.2f})"
            lines.append(f"| diff {label} | " + " | ".join(cell(n, diff) for n in nfes) + " |")
        for label in labels:
            def spread(n):
                slices = per[n][next(k for k in per[n] if k.endswith("_slices"))].get(label)
                return None if slices is None else f"{min(slices):.2f}-{max(slices):.2f}"
            lines.append(f"| 400-image slices, {label} | " + " | ".join(cell(n, spread) for n in nfes) + " |")
        lines.append("")
    return lines


def plot_fid(report, path):
    """FID against NFE, default schedule (dashed) vs each GITS setting, one panel per FID run and solver."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(key, solver, per) for key in sorted(report) if key.startswith("fid") and isinstance(report[key], dict)
              and "rows" in report[key] for solver, per in report[key]["rows"].items()]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), squeeze=False)
    colours = {}                                       # one colour per setting across the panels
    for ax, (key, solver, per) in zip(axes[0], panels):
        nfes = sorted(per, key=int)
        labels = [label for label in dict.fromkeys(l for n in nfes for l in per[n]["fid"])
                  if all(label in per[n]["fid"] for n in nfes)]
        for label in labels:
            colour = colours.setdefault(label, f"C{len(colours)}")
            ax.plot([int(n) for n in nfes], [per[n]["fid"][label] for n in nfes], marker="o", color=colour,
                    linestyle="--" if label == "default" else "-", label=label)
        run = report[key]
        ax.set(title=f"{solver}, {run['images']} images from seed {run.get('first_seed', 0)}", xlabel="NFE", ylabel="FID")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_endpoint(report, path):
    """Endpoint RMSE against NFE on the analytic models: one panel per model and solver, the
    polynomial and logSNR grids dashed, each GITS setting solid."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = report.get("endpoint_error", {})
    if not models:
        return
    fig, axes = plt.subplots(len(models), len(SOLVERS), figsize=(3.6 * len(SOLVERS), 3.2 * len(models)),
                             squeeze=False)
    for row_axes, (spec, run) in zip(axes, models.items()):
        for ax, (solver, per) in zip(row_axes, run["rows"].items()):
            nfes = sorted(per, key=int)
            for label in per[nfes[0]]["rmse"]:
                ax.plot([int(n) for n in nfes], [per[n]["rmse"][label] for n in nfes], marker="o", markersize=3,
                        linestyle="--" if label in BASES else "-", label=label)
            ax.set(title=f"{solver}, {spec}", xlabel="NFE", ylabel="RMSE to exact endpoint", yscale="log")
            ax.title.set_fontsize(8)
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def store_fid(report, run):
    """Put a FID run into the report: merged into the recorded run on the same images (same count and
    first seed), else under a key of its own, so a run on other images never replaces a recorded one."""
    same = lambda key: (report[key].get("images"), report[key].get("first_seed", 0)) == (run["images"],
                                                                                          run.get("first_seed", 0))
    keys = [k for k in report if k.startswith("fid") and isinstance(report[k], dict) and "rows" in report[k]]
    key = next((k for k in keys if same(k)), None)
    if key is None:
        key = "fid" if "fid" not in report else f"fid_{run['images']}_from_seed_{run.get('first_seed', 0)}"
        report[key] = run
    else:
        merge_fid(report[key], run)


def merge_fid(old, new):
    """Add a FID run to an earlier one on the same images: rows and labels accumulate, a
    configuration measured again is replaced."""
    for solver, per in new["rows"].items():
        kept = old["rows"].setdefault(solver, {})
        for nfe, row in per.items():
            target = kept.setdefault(str(nfe), {})
            for part, values in row.items():
                target.setdefault(part, {}).update(values)
    old["settings"] = [list(x) for x in dict.fromkeys(tuple(x) for x in old["settings"] + new["settings"])]
    return old


def merge_report(report: dict, theirs: dict, log, name: str = "the other report") -> None:
    """Fold a report made side by side (its own ``--out``) into ``report``: FID runs accumulate; the
    converged and search-cost sections and each model's endpoint section replace this report's.
    Bundled-model sections come only from a report measured on ``report``'s bundled weights."""
    bundled_ok = theirs.get("bundled_weights") == report.get("bundled_weights")
    for key, run in theirs.items():
        if key.startswith("fid") and isinstance(run, dict) and "rows" in run and bundled_ok:
            store_fid(report, run)
        elif key in ("converged", "search_cost") and bundled_ok:
            report[key] = run
        elif key == "endpoint_error":
            report.setdefault(key, {}).update(run)
    if not bundled_ok:
        log(f"not merged from {name}: its bundled-model sections were measured on other weights "
            f"({theirs.get('bundled_weights')}) than this report's ({report.get('bundled_weights')})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gmm:digits,gmm:synthetic:16:3x32x32:0,gmm:fashion-mnist")
    parser.add_argument("--seeds", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=256)
    parser.add_argument("--endpoint-settings", default="dev:1.15,l2:1.15,dev:1.05,l2:1.0",
                        help="GITS metric:coeff pairs for the endpoint section (the first is the package default)")
    parser.add_argument("--fid", action="store_true")
    parser.add_argument("--fid-images", type=int, default=2000)
    parser.add_argument("--fid-solvers", default="ipndm", help="comma-separated (any of euler,ipndm,dpmpp,unipc)")
    parser.add_argument("--fid-nfes", default="4-10")
    parser.add_argument("--fid-settings", default="dev:1.05,dev:1.15", help="GITS metric:coeff pairs, comma-separated")
    parser.add_argument("--fid-first-seed", type=int, default=0,
                        help="image seeds first..first+images-1 (another range confirms a setting chosen on 0..)")
    parser.add_argument("--converged", action="store_true", help="RMSE to converged samples on the bundled model")
    parser.add_argument("--converged-seeds", type=int, default=200)
    parser.add_argument("--converged-settings", default="l2:1.15,dev:1.15,l2:1.0,dev:1.0,dev:0.9")
    parser.add_argument("--cost", action="store_true")
    parser.add_argument("--cost-configs", default="1x128,1x256,2x256",
                        help="THREADSxBATCH settings for --cost; runs are added to the ones already recorded")
    parser.add_argument("--skip-endpoint", action="store_true")
    parser.add_argument("--merge", nargs="+", default=[], metavar="GITS_JSON",
                        help="Fold other reports (e.g. parallel runs with their own --out) into this one: "
                             "FID runs merge, converged and search-cost sections and endpoint sections (per "
                             "model) replace this report's; bundled sections only from today's weights")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--threads", type=int, default=1, help="Torch threads (the --cost section sets its own)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gits.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    report.update({"date": _dt.date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
                   f"{torch.get_num_threads()} thread(s), torch {torch.__version__}",
                   "diffsampler_version": diffsampler.__version__, "warmup": args.warmup, "seeds": args.seeds})
    log = lambda msg: print(msg, flush=True)
    if args.converged or args.fid or args.cost or args.merge:
        for key in drop_stale_bundled(report, ["converged", "fid*", "search_cost"]):
            log(f"dropped {key!r} of {path}: measured on other weights than today's bundled model")
    if not args.skip_endpoint:
        settings = _parse_settings(args.endpoint_settings)
        report["endpoint_error"] = {spec: endpoint_section(spec, args.seeds, args.warmup, settings, log)
                                    for spec in args.models.split(",")}
    if args.converged:
        report["converged"] = converged_section(args.converged_seeds, args.warmup,
                                                _parse_settings(args.converged_settings), log)
    if args.fid:
        measured = fid_section(args.fid_images, args.warmup, log, solvers=tuple(args.fid_solvers.split(",")),
                               nfes=tuple(parse_ranges(args.fid_nfes, "NFEs", "NFE", "4-10 or 4-6,9")), settings=_parse_settings(args.fid_settings),
                               first_seed=args.fid_first_seed)
        store_fid(report, json.loads(json.dumps(measured)))
    for other in args.merge:
        merge_report(report, json.loads(Path(other).read_text()), log, name=other)
    if args.cost:
        configs = tuple(tuple(int(v) for v in c.split("x")) for c in args.cost_configs.split(","))
        measured = cost_section(log, configs)
        measured["runs"] = report.get("search_cost", {}).get("runs", []) + measured["runs"]
        report["search_cost"] = measured
    write_atomic(path, json.dumps(report, indent=1).encode())
    report = json.loads(path.read_text())           # as recorded (string NFE keys) for the table and plots
    write_atomic(out / "gits.md", markdown(report).encode())
    plot_fid(report, out / "gits_fid.png")
    plot_endpoint(report, out / "gits_endpoint.png")
    print(f"wrote {path} and {out / 'gits.md'}")


if __name__ == "__main__":
    main()
