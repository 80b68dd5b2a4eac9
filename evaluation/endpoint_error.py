"""Endpoint error of every registered solver against the exact ODE endpoint, plus solver overhead.

For each model (default: the optimal denoiser of sklearn's 8x8 digits and a 3072-dim synthetic
Gaussian mixture), every solver in ``diffsampler.SOLVERS`` is run at NFE 3..10 (where valid) with
its default schedule and with polynomial (rho=7), logsnr and time_uniform (rho=2) grids (duplicates
of the default skipped), each with and without the analytical first step (AFS).  The error of a
sample is the RMSE over pixels between the sample and the exact endpoint of the probability-flow
ODE from the same noise (adaptive DOP853, ``diffsampler.reference.solve_ode``, cached under
``evaluation/.cache/``); the table reports its mean (and the JSON also the median) over seeds.

The overhead part times ``sample()`` at NFE 10 (default schedule, no AFS) on ``gmm:digits`` with
batch 64 and on a small neural denoiser (the bundled Fashion-MNIST U-Net if it loads, otherwise the
same architecture with random weights) and reports the time outside the model per step as a
percentage of one model call.

    python -m evaluation.endpoint_error                 # full run (256 seeds, both models)
    python -m evaluation.endpoint_error --seeds 32 --no-overhead --out /tmp/ee   # quick check
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

import diffsampler
from diffsampler import SOLVERS, get_solver, sample
from diffsampler import schedules as schedules_module
from diffsampler.seeds import seed_noise
from evaluation.common import HERE, exact_endpoints, load_model, rmse_per_seed, slug

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
NFES = list(range(3, 11))
DEFAULT_MODELS = "gmm:digits,gmm:synthetic:16:3x32x32:0"

# The schedules every solver is run with (besides its default, which usually is one of them).
STANDARD_SCHEDULES: List[Tuple[str, Dict[str, float]]] = [
    ("polynomial", {"rho": 7.0}),
    ("logsnr", {}),
    ("time_uniform", {"rho": 2.0}),
]
# Solver options used for the rows (the registry defaults, stated explicitly so the record is exact).
SOLVER_OPTIONS: Dict[str, Dict[str, object]] = {
    "ipndm": {"max_order": 4},
    "ipndm_v": {"max_order": 4},
    "deis": {"max_order": 4},        # tAB3
    "dpmpp": {"max_order": 3},
    "unipc": {"max_order": 3},
}
# Extra rows: (row name, registry name, options, note).
EXTRA_VARIANTS = [
    ("dpmpp_legacy", "dpmpp", {"max_order": 3, "legacy_third_order": True},
     "DPM-Solver++ 3M with the third-order weight of the reference code / diffusers"),
]


# ------------------------------------------------------------------------------------------------
# configurations
# ------------------------------------------------------------------------------------------------
def solver_variants() -> List[Dict[str, object]]:
    """One entry per row family: every registered solver, then the extra variants."""
    out = []
    for name in SOLVERS:
        out.append({"row": name, "solver": name, "options": dict(SOLVER_OPTIONS.get(name, {})), "note": ""})
        for row, solver, options, note in EXTRA_VARIANTS:
            if solver == name:
                out.append({"row": row, "solver": solver, "options": dict(options), "note": note})
    return out


def _grid(schedule, options, num_steps: int) -> torch.Tensor:
    _, fn = schedules_module.resolve(schedule, options)
    return fn(num_steps, SIGMA_MIN, SIGMA_MAX)


def schedule_label(name: str, options: Dict[str, object]) -> str:
    if not options:
        return name
    return name + " " + ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in options.items())


def schedules_for(solver_cls) -> List[Dict[str, object]]:
    """The default schedule first, then the standard schedules that differ from it (compared by grid)."""
    default_name = solver_cls.default_schedule
    default_opts = dict(solver_cls.default_schedule_options)
    default_grids = [_grid(default_name, default_opts, n) for n in (3, 7)]
    rows = []
    matched = None
    for name, opts in STANDARD_SCHEDULES:
        if all(torch.allclose(_grid(name, opts, n), g, rtol=1e-12, atol=0) for n, g in zip((3, 7), default_grids)):
            matched = (name, opts)
    if matched is None:
        rows.append({"schedule": default_name, "schedule_options": default_opts, "default": True})
    for name, opts in STANDARD_SCHEDULES:
        is_default = matched is not None and matched[0] == name
        rows.append({"schedule": name, "schedule_options": dict(opts), "default": is_default})
    rows.sort(key=lambda r: not r["default"])  # default first, stable otherwise
    return rows


def configurations() -> List[Dict[str, object]]:
    configs = []
    for variant in solver_variants():
        solver = get_solver(variant["solver"], **variant["options"])
        for sched in schedules_for(type(solver)):
            for afs in (False, True):
                valid = set(solver.valid_nfes(afs))
                nfes = [n for n in NFES if n in valid]
                configs.append({**variant, **sched, "afs": afs, "nfes": nfes})
    return configs


def row_label(cfg: Dict[str, object]) -> str:
    solver = str(cfg["row"])
    if cfg["row"] == "dpmpp_legacy":
        solver = "dpmpp (legacy 3rd order, reference-code formula)"
    sched = schedule_label(cfg["schedule"], cfg["schedule_options"]) + (" (default)" if cfg["default"] else "")
    return f"{solver} · {sched} · {'AFS' if cfg['afs'] else 'no AFS'}"


# ------------------------------------------------------------------------------------------------
# reference endpoints
# ------------------------------------------------------------------------------------------------
def nearest_component(model, x: torch.Tensor) -> torch.Tensor:
    """Index of the mixture mean nearest to each sample (for gmm:digits: the training image it landed on)."""
    flat = x.reshape(x.shape[0], -1).to(torch.float64)
    sq = flat.square().sum(1, keepdim=True) - 2 * flat @ model.means.T + model.means.square().sum(1)[None, :]
    return sq.argmin(1)


# ------------------------------------------------------------------------------------------------
# endpoint errors
# ------------------------------------------------------------------------------------------------
def evaluate_model(spec: str, args, log) -> Dict[str, object]:
    model = load_model(spec)
    shape = tuple(model.shape)
    n = args.seeds
    log(f"[{spec}] shape {shape}, {model.means.shape[0]} components; reference tol={args.ref_tol:g}, chunks of {args.ref_chunk}")
    ref, ref_seconds = exact_endpoints(model, spec, 0, n, args.ref_tol, args.ref_chunk, args.cache)
    log(f"[{spec}] reference endpoints for {n} seeds: {ref_seconds:.1f} s of solving (cached)")

    # accuracy of the reference: same chunk solved with a 100x tighter tolerance
    check_n = min(n, args.ref_chunk)
    tight, tight_seconds = exact_endpoints(model, spec, 0, check_n, args.check_tol, check_n, args.cache)
    diff = rmse_per_seed(ref[:check_n], tight)
    check = {"check_tol": args.check_tol, "seeds": [0, check_n - 1], "rmse_max": float(diff.max()),
             "rmse_mean": float(diff.mean()), "abs_max": float((ref[:check_n] - tight).abs().max()),
             "seconds": tight_seconds}
    log(f"[{spec}] reference accuracy (tol {args.ref_tol:g} vs {args.check_tol:g}, seeds 0-{check_n - 1}): "
        f"RMSE max {check['rmse_max']:.2e}, |diff| max {check['abs_max']:.2e}")

    noise = seed_noise(range(n), shape, dtype=torch.float64)
    ref_mode = nearest_component(model, ref)
    results, mismatches = [], []
    t_start = time.perf_counter()
    for cfg in configurations():
        for nfe in cfg["nfes"]:
            kwargs = dict(solver=cfg["solver"], nfe=nfe, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX,
                          afs=cfg["afs"], **cfg["options"])
            if not cfg["default"]:
                kwargs.update(schedule=cfg["schedule"], schedule_options=cfg["schedule_options"])
            t0 = time.perf_counter()
            entry = {"model": spec, "row": cfg["row"], "label": row_label(cfg), "solver": cfg["solver"],
                     "options": cfg["options"], "schedule": cfg["schedule"],
                     "schedule_options": cfg["schedule_options"], "default_schedule": cfg["default"],
                     "afs": cfg["afs"], "nfe": nfe}
            try:
                with torch.no_grad():
                    res = sample(model, noise, **kwargs)
            except Exception as err:  # recorded, not fatal: a failing configuration is a finding
                entry.update(error=f"{type(err).__name__}: {err}")
                results.append(entry)
                log(f"  {entry['label']} nfe={nfe}: ERROR {entry['error']}")
                continue
            err = rmse_per_seed(res.samples, ref)
            entry.update(nfe_measured=res.nfe, num_steps=len(res.sigmas) - 1,
                         sigmas=[float(s) for s in res.sigmas],
                         rmse_mean=float(err.mean()), rmse_median=float(err.median()),
                         rmse_max=float(err.max()),
                         mode_mismatch=float((nearest_component(model, res.samples) != ref_mode).double().mean()),
                         finite=bool(torch.isfinite(err).all()),
                         seconds=time.perf_counter() - t0)
            if res.nfe != nfe:
                mismatches.append(f"{entry['label']}: requested nfe={nfe}, measured {res.nfe}")
            results.append(entry)
        done = [r for r in results if r["label"] == row_label(cfg) and "rmse_mean" in r]
        log(f"  {row_label(cfg):70s} " + " ".join(f"{r['rmse_mean']:.1e}" for r in done))
    log(f"[{spec}] {len(results)} runs in {time.perf_counter() - t_start:.1f} s")
    info = {"spec": spec, "shape": list(shape), "dim": int(np.prod(shape)), "components": int(model.means.shape[0]),
            "reference": {"method": "diffsampler.reference.solve_ode (DOP853 in log sigma)", "tol": args.ref_tol,
                          "chunk": args.ref_chunk, "seconds": ref_seconds, "accuracy": check},
            "runs": results, "nfe_mismatches": mismatches}
    return info


# ------------------------------------------------------------------------------------------------
# overhead
# ------------------------------------------------------------------------------------------------
class TimedDenoiser:
    """Wraps a denoiser and accumulates the wall time spent inside it."""

    def __init__(self, inner):
        self.inner, self.seconds, self.calls = inner, 0.0, 0

    def __call__(self, x, sigma, **cond):
        t0 = time.perf_counter()
        out = self.inner(x, sigma, **cond)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def neural_denoiser(log):
    """The bundled Fashion-MNIST model, or the same architecture with random weights if it does not load."""
    try:
        from diffsampler.models.bundled import load_bundled
        model = load_bundled("fashion-mnist")
        cfg = getattr(model, "config_dict", {}) or {}
        return model, {"name": "bundled fashion-mnist U-Net (trained weights)", "random_weights": False,
                       "training_steps": cfg.get("steps"), "weights_sha256": cfg.get("weights_sha256")}
    except Exception as err:
        log(f"[overhead] load_bundled('fashion-mnist') failed ({type(err).__name__}: {err}); "
            "using the same U-Net architecture with random weights")
        from diffsampler.tools.train_unet import TrainConfig, build_denoiser
        model = build_denoiser(TrainConfig(), (1, 28, 28), 10)
        model.net.requires_grad_(False).eval()
        return model, {"name": "fashion-mnist U-Net architecture (TrainConfig defaults), random weights",
                       "random_weights": True, "load_error": f"{type(err).__name__}: {err}"}


def _noop_denoiser(x, sigma, **cond):
    return x


def measure_overhead(model, noise: torch.Tensor, repeats: int, nfe: int = 10) -> Dict[str, object]:
    """Time sample() at ``nfe`` for every solver variant; the repeats go round-robin over the solvers so
    that load from other processes spreads evenly.  The percentage uses the pooled median model-call time
    (all solvers call the same model on the same batch), which is steadier than each solver's own."""
    variants = solver_variants()
    timed = TimedDenoiser(model)
    kwargs = {v["row"]: dict(solver=v["solver"], nfe=nfe, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, **v["options"])
              for v in variants}
    runs = {v["row"]: [] for v in variants}
    noop = {v["row"]: [] for v in variants}
    with torch.no_grad():
        for v in variants:                                   # warm-up
            sample(timed, noise, **kwargs[v["row"]])
            sample(_noop_denoiser, noise, **kwargs[v["row"]])
        for _ in range(repeats):
            for v in variants:
                timed.seconds, timed.calls = 0.0, 0
                t0 = time.perf_counter()
                res = sample(timed, noise, **kwargs[v["row"]])
                total = time.perf_counter() - t0
                assert res.nfe == nfe == timed.calls, (v["row"], res.nfe, timed.calls)
                runs[v["row"]].append((total, timed.seconds, len(res.sigmas) - 1))
                t0 = time.perf_counter()
                sample(_noop_denoiser, noise, **kwargs[v["row"]])
                noop[v["row"]].append(time.perf_counter() - t0)
    pooled_call = statistics.median(m / nfe for rs in runs.values() for _, m, _ in rs)
    rows = []
    for v in variants:
        rs = runs[v["row"]]
        steps = rs[0][2]
        over_step = statistics.median((t - m) / steps for t, m, _ in rs)
        rows.append({"row": v["row"], "solver": v["solver"], "options": v["options"], "nfe": nfe,
                     "num_steps": steps, "repeats": repeats,
                     "total_ms_median": 1e3 * statistics.median(t for t, _, _ in rs),
                     "model_ms_median": 1e3 * statistics.median(m for _, m, _ in rs),
                     "model_call_ms_own": 1e3 * statistics.median(m / nfe for _, m, _ in rs),
                     "overhead_ms_median": 1e3 * statistics.median(t - m for t, m, _ in rs),
                     "overhead_per_step_ms": 1e3 * over_step,
                     "overhead_per_step_ms_min": 1e3 * min((t - m) / steps for t, m, _ in rs),
                     "overhead_per_step_pct_of_call": 100 * over_step / pooled_call,
                     "noop_model_per_step_ms": 1e3 * statistics.median(noop[v["row"]]) / steps,
                     "under_5pct": 100 * over_step / pooled_call < 5.0})
    return {"model_call_ms": 1e3 * pooled_call, "rows": rows}


def overhead_section(args, log) -> Dict[str, object]:
    out = {"nfe": 10, "batch": args.overhead_batch, "schedule": "solver default", "afs": False,
           "definition": "overhead per step = median over repeats of (sample() wall time - time inside the denoiser)"
                         " / num_steps; % = that / the pooled median time of one model call.  noop_model_per_step_ms:"
                         " sample() time per step with a denoiser that returns its input (the loop's floor)."}
    digits = load_model("gmm:digits")
    noise = seed_noise(range(args.overhead_batch), digits.shape, dtype=torch.float64)
    log(f"[overhead] gmm:digits, {args.overhead_repeats_gmm} repeats ...")
    out["gmm:digits"] = {"model": "gmm:digits (float64 exact denoiser, 1797 components)", "dtype": "float64",
                         **measure_overhead(digits, noise, args.overhead_repeats_gmm)}
    net, info = neural_denoiser(log)
    noise = seed_noise(range(args.overhead_batch), (1, 28, 28), dtype=torch.float32)
    log(f"[overhead] {info['name']}, {args.overhead_repeats_net} repeats ...")
    out["neural"] = {**info, "model": info["name"], "dtype": "float32",
                     "parameters": int(sum(p.numel() for p in net.parameters())),
                     **measure_overhead(net, noise, args.overhead_repeats_net)}
    return out


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def fmt(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.2e}"


def table_rows(info) -> Tuple[List[str], Dict[str, Dict[int, Dict[str, object]]]]:
    labels, cells = [], {}
    for r in info["runs"]:
        if r["label"] not in cells:
            labels.append(r["label"])
            cells[r["label"]] = {}
        cells[r["label"]][r["nfe"]] = r
    return labels, cells


def non_monotone(info) -> List[str]:
    """Rows whose mean error grows from one valid NFE to the next."""
    labels, cells = table_rows(info)
    notes = []
    for label in labels:
        seq = [(n, cells[label][n]["rmse_mean"]) for n in NFES if n in cells[label] and "rmse_mean" in cells[label][n]]
        ups = [f"{a}->{b} ({ea:.2e} -> {eb:.2e})" for (a, ea), (b, eb) in zip(seq, seq[1:]) if eb > ea]
        if ups:
            notes.append(f"{label}: " + ", ".join(ups))
    return notes


def table(info, key: str, pct: bool = False) -> List[str]:
    """A markdown table, rows = configurations, columns = NFE; the lowest value per column in bold."""
    labels, cells = table_rows(info)
    best = {}
    for n in NFES:
        vals = [cells[l][n][key] for l in labels if n in cells[l] and key in cells[l][n]]
        best[n] = min(vals) if vals else None
    out = ["| solver · schedule · AFS | " + " | ".join(f"NFE {n}" for n in NFES) + " |",
           "|---|" + "---:|" * len(NFES)]
    for label in labels:
        row = []
        for n in NFES:
            r = cells[label].get(n)
            if r is None:
                row.append("–")
            elif key not in r:
                row.append("error")
            else:
                s = f"{100 * r[key]:.1f}" if pct else fmt(r[key])
                row.append(f"**{s}**" if r[key] == best[n] else s)
        out.append(f"| {label} | " + " | ".join(row) + " |")
    return out


def best_per_nfe(info) -> Dict[int, Dict[str, object]]:
    best = {}
    for r in info["runs"]:
        if "rmse_mean" not in r or not math.isfinite(r["rmse_mean"]):
            continue
        if r["nfe"] not in best or r["rmse_mean"] < best[r["nfe"]]["rmse_mean"]:
            best[r["nfe"]] = r
    return best


def _load(machine) -> str:
    start, end = machine.get("load_average_at_start"), machine.get("load_average_at_end")
    return "n/a" if not start else f"{start[0]:.1f} at start" + (f", {end[0]:.1f} at end" if end else "")


def markdown(report) -> str:
    lines = ["# Endpoint error of the solvers", ""]
    meta = report["metadata"]
    lines += [f"Generated by `python -m evaluation.endpoint_error` on {meta['date']} "
              f"({meta['machine']['platform']}, {meta['machine']['cpu_count']} CPUs, torch {meta['machine']['torch']}, "
              f"{meta['machine']['threads']} thread(s), load average {_load(meta['machine'])}); "
              f"{meta['seeds']} seeds per model, sigma {SIGMA_MAX:g} -> {SIGMA_MIN:g}.", "",
              "Cells: mean over seeds of the per-sample RMSE (over pixels) between the sample and the exact ODE "
              "endpoint from the same noise; best per NFE column in **bold**; – = NFE not reachable with that "
              "solver/AFS setting.  Solvers: ipndm/ipndm_v/deis max_order 4 (deis = tAB3), dpmpp/unipc max_order 3.  "
              "'mode mismatch' = fraction of seeds whose sample is nearest to a different mixture mean (for "
              "gmm:digits: a different training image) than the exact endpoint.", ""]
    for spec, info in report["models"].items():
        acc = info["reference"]["accuracy"]
        lines += [f"## `{spec}` ({'x'.join(map(str, info['shape']))}, {info['components']} components)", "",
                  f"Reference: DOP853, tol={info['reference']['tol']:g}; against tol={acc['check_tol']:g} on seeds "
                  f"{acc['seeds'][0]}-{acc['seeds'][1]}: per-seed RMSE max {acc['rmse_max']:.1e} (|diff| max {acc['abs_max']:.1e}).", ""]
        best = best_per_nfe(info)
        lines += ["Mean RMSE:", ""] + table(info, "rmse_mean") + [""]
        lines += ["Best configuration at each NFE (lowest mean RMSE):", ""]
        for n in NFES:
            if n in best:
                b = best[n]
                lines.append(f"- NFE {n}: {b['label']} — mean {fmt(b['rmse_mean'])}, median {fmt(b['rmse_median'])}, "
                             f"mode mismatch {100 * b['mode_mismatch']:.1f}%")
        lines += ["", "Median RMSE over seeds:", ""] + table(info, "rmse_median")
        lines += ["", "Mode mismatch (% of seeds):", ""] + table(info, "mode_mismatch", pct=True)
        notes = non_monotone(info)
        lines += ["", f"Rows whose error grows with NFE: {len(notes)}" + (":" if notes else "."), ""]
        lines += [f"- {n}" for n in notes]
        errors = [r for r in info["runs"] if "error" in r]
        if errors:
            lines += ["", "Failed runs:", ""] + [f"- {r['label']} nfe={r['nfe']}: {r['error']}" for r in errors]
        if info["nfe_mismatches"]:
            lines += ["", "NFE mismatches:", ""] + [f"- {m}" for m in info["nfe_mismatches"]]
        lines.append("")
    ov = report.get("overhead")
    if ov:
        lines += ["## Solver overhead at NFE 10", "",
                  f"Batch {ov['batch']}, default schedule, no AFS.  Overhead/step = (sample() wall time - time inside "
                  "the denoiser) / steps (median over repeats, run round-robin over the solvers); % of call = that / "
                  "the pooled median time of one model call; target < 5%.  'no-op' = sample() time per step with a "
                  "denoiser that returns its input (the loop's own floor).", ""]
        for key in ("gmm:digits", "neural"):
            sec = ov[key]
            extra = f", {sec['parameters']:,} parameters" if "parameters" in sec else ""
            steps = f", trained {sec['training_steps']} steps" if sec.get("training_steps") else ""
            lines += [f"### {sec['model']} ({sec['dtype']}{extra}{steps}): one model call {sec['model_call_ms']:.2f} ms", "",
                      "| solver | steps | sample() ms | in model ms | overhead/step ms | % of call | < 5% | no-op ms/step |",
                      "|---|---:|---:|---:|---:|---:|:-:|---:|"]
            for r in sec["rows"]:
                lines.append(f"| {r['row']} | {r['num_steps']} | {r['total_ms_median']:.1f} | {r['model_ms_median']:.1f} | "
                             f"{r['overhead_per_step_ms']:.3f} | {r['overhead_per_step_pct_of_call']:.2f}% | "
                             f"{'yes' if r['under_5pct'] else 'NO'} | {r['noop_model_per_step_ms']:.3f} |")
            lines.append("")
    return "\n".join(lines)


def plot(info, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    colors = plt.get_cmap("tab10")
    rows = []
    for r in info["runs"]:
        if r["row"] not in rows:
            rows.append(r["row"])
    for k, row in enumerate(rows):
        for afs in (False, True):
            pts = sorted((r["nfe"], r["rmse_mean"]) for r in info["runs"]
                         if r["row"] == row and r["afs"] == afs and r["default_schedule"] and "rmse_mean" in r)
            if not pts:
                continue
            sched = next(r for r in info["runs"] if r["row"] == row and r["default_schedule"])
            label = f"{row} ({schedule_label(sched['schedule'], sched['schedule_options'])})" + (" + AFS" if afs else "")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colors(k % 10), marker="o", ms=3,
                    linestyle="--" if afs else "-", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel("endpoint RMSE (mean over seeds)")
    ax.set_title(f"{info['spec']}: endpoint error vs NFE (default schedules; dashed = AFS)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
def git_info() -> Dict[str, object]:
    """HEAD and the package files that differ from it when the run started (others edit concurrently)."""
    def run(*cmd):
        return subprocess.run(["git", *cmd], cwd=HERE, capture_output=True, text=True, check=True).stdout
    try:
        dirty = [line[3:] for line in run("status", "--porcelain", "--", "diffsampler").splitlines()]
        return {"commit": run("rev-parse", "HEAD").strip(), "package_files_modified_or_untracked": dirty}
    except Exception:
        return {"commit": None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=256, help="seeds 0..N-1 per model (default 256)")
    p.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated model specs (default {DEFAULT_MODELS})")
    p.add_argument("--out", type=Path, default=HERE / "results", help="output folder (default evaluation/results)")
    p.add_argument("--cache", type=Path, default=HERE / ".cache", help="reference endpoint cache (default evaluation/.cache)")
    p.add_argument("--ref-tol", type=float, default=1e-9)
    p.add_argument("--check-tol", type=float, default=1e-11, help="tolerance of the accuracy check of the reference")
    p.add_argument("--ref-chunk", type=int, default=64, help="seeds per reference ODE solve (one adaptive system)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-overhead", dest="overhead", action="store_false", help="skip the overhead measurement")
    p.add_argument("--overhead-batch", type=int, default=64)
    p.add_argument("--overhead-repeats-gmm", type=int, default=20, help="repeats per solver on gmm:digits")
    p.add_argument("--overhead-repeats-net", type=int, default=5, help="repeats per solver on the neural denoiser")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_all:7.1f}s] {msg}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "metadata": {
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
            "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
            "diffsampler": diffsampler.__version__, "git": git_info(),
            "seeds": args.seeds, "seed_noise": "diffsampler.seeds.seed_noise(range(seeds), shape, dtype=float64)",
            "sigma_min": SIGMA_MIN, "sigma_max": SIGMA_MAX, "nfes": NFES,
            "schedules": [schedule_label(n, o) for n, o in STANDARD_SCHEDULES] + ["solver default"],
            "solver_options": {v["row"]: v["options"] for v in solver_variants()},
            "metric": "per seed: RMSE over pixels between sample and exact endpoint; rmse_mean/rmse_median over seeds",
            "reference_tol": args.ref_tol, "reference_check_tol": args.check_tol,
        },
        "models": {},
    }
    for spec in [s.strip() for s in args.models.split(",") if s.strip()]:
        report["models"][spec] = evaluate_model(spec, args, log)
        plot(report["models"][spec], args.out / f"endpoint_error_{slug(spec)}.png")
    if args.overhead:
        report["overhead"] = overhead_section(args, log)
    report["metadata"]["reference_accuracy"] = {s: m["reference"]["accuracy"] for s, m in report["models"].items()}
    report["metadata"]["runtime_seconds"] = time.perf_counter() - t_all
    if hasattr(os, "getloadavg"):
        report["metadata"]["machine"]["load_average_at_end"] = list(os.getloadavg())
    (args.out / "endpoint_error.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "endpoint_error.md").write_text(markdown(report) + "\n")
    log(f"wrote {args.out / 'endpoint_error.json'} and {args.out / 'endpoint_error.md'}")
    mismatches = [m for info in report["models"].values() for m in info["nfe_mismatches"]]
    assert not mismatches, "measured NFE differs from the requested NFE:\n" + "\n".join(mismatches)
    return 0


if __name__ == "__main__":
    sys.exit(main())
