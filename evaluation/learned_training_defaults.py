"""How the learned samplers' training defaults were chosen: teacher steps, validation and confirmation seeds.

    python -m evaluation.learned_training_defaults            # ~10 min on one thread

Every learned sampler but AMED (ld3, s4s, pas, epd), with its default base (``auto``) at NFE 3-6, is
trained on each analytic benchmark model under each candidate setting (at least ``T`` teacher steps,
``V`` validation seeds, ``C`` confirmation seeds: 0 for none) and scored against exact ODE endpoints on **selection seeds** 3,000,000..
3,000,127: disjoint from the training (1,000,000..), validation (2,000,000..) and test seeds
(0..N-1) of ``learned_benchmark.py``, so the defaults are not picked on the seeds the benchmark
reports.  Per cell: the learned sampler's mean per-seed RMSE over its own base's (the neutral
parameters'); per setting: the geometric mean of those ratios, how many cells end worse than
their base, and the same against the first setting.  The teacher's own endpoint error against
the base's is recorded too (the floor a student of that teacher sees).
"""
from __future__ import annotations

import argparse
import math
import time
from typing import Dict, List

import torch

from diffsampler import learn, sample
from diffsampler.learned.base import LearnedSampler
from diffsampler.learned.distill import refine, teacher_points
from diffsampler.learned.registry import LEARNED
from diffsampler.plan import make_plan
from diffsampler.seeds import seed_noise
from evaluation.common import exact_endpoints, load_model, machine, markdown_table, rmse_per_seed, write_report

MODELS = ["gmm:digits", "gmm:digits:0.1", "gmm:synthetic:32:1x8x8:5", "gmm:synthetic:16:3x32x32:0"]
METHODS = ["ld3", "s4s", "pas", "epd"]
# (min teacher steps, validation seeds, confirmation seeds); first: the old default
SETTINGS = [(24, 64, 0), (48, 64, 0), (48, 256, 0), (48, 256, 256)]
FIRST_SEED, SEEDS = 3_000_000, 128
PROBE = dict(solver="ipndm_v", schedule="time_uniform", schedule_options={"rho": 2.0}, afs=True, legacy=True)


def teacher_error(model, noise, reference, nfe: int, steps: int) -> Dict[str, float]:
    """Endpoint RMSE of the default teacher (DPM-Solver++ on the refined grid of an NFE-``nfe``
    base, here ipndm_v on the time-quadratic grid with AFS) and of that base, against exact endpoints."""
    plan = make_plan(nfe=nfe, model=model, shape=model.shape, **PROBE)
    teacher = make_plan("dpmpp", sigmas=refine(list(plan.sigmas), teacher_points(plan.steps, steps)), model=model)
    base = sample(model, noise, plan=plan).samples
    taught = sample(model, noise, plan=teacher).samples
    return {"base": float(rmse_per_seed(base, reference).mean()), "teacher": float(rmse_per_seed(taught, reference).mean()),
            "teacher_steps": teacher.steps}


def cell(model, noise, reference, method: str, nfe: int, steps: int, val_images: int, confirm_images: int) -> dict:
    cls = LEARNED[method]
    saved = LearnedSampler.min_teacher_steps
    LearnedSampler.min_teacher_steps = steps        # the methods measured here inherit it
    try:
        t0 = time.perf_counter()
        sampler = learn(method, model, nfe=nfe, dtype=torch.float64, solver=cls.default_solver, val_images=val_images,
                        confirm_images=confirm_images)
        seconds = time.perf_counter() - t0
    finally:
        LearnedSampler.min_teacher_steps = saved
    learned = rmse_per_seed(sample(model, noise, learned=sampler).samples, reference)
    base = {"solver": cls.default_solver, **sampler.settings.get("base_choice", {}).get("chosen", {})}
    neutral_sampler = cls.create(model, model.shape, nfe=nfe, dtype=torch.float64, **base)
    neutral = rmse_per_seed(sample(model, noise, learned=neutral_sampler).samples, reference)
    return {"rmse": float(learned.mean()), "neutral": float(neutral.mean()),
            "ratio": float(learned.mean() / neutral.mean()), "median_ratio": float((learned / neutral).median()),
            "best_iteration": sampler.settings["best_iteration"], "train_s": seconds}


def summary(cells: Dict[str, dict], settings) -> List[dict]:
    first = label(*settings[0])
    rows = []
    for s in settings:
        name = label(*s)
        ratios = [c[name]["ratio"] for c in cells.values()]
        against = [c[name]["ratio"] / c[first]["ratio"] for c in cells.values()]
        rows.append({"setting": name, "cells": len(ratios),
                     "geomean_ratio": math.exp(sum(map(math.log, ratios)) / len(ratios)),
                     "worse_than_base": sum(r > 1 + 1e-9 for r in ratios),
                     "neutral": sum(abs(r - 1) <= 1e-9 for r in ratios),
                     "geomean_vs_first": math.exp(sum(map(math.log, against)) / len(against)),
                     "train_s": sum(c[name]["train_s"] for c in cells.values())})
    return rows


def label(steps: int, val_images: int, confirm_images: int) -> str:
    confirm = f", confirmed on {confirm_images} more" if confirm_images else ""
    return f"teacher >= {steps} steps, {val_images} validation seeds{confirm}"


def markdown(report: dict) -> str:
    lines = ["# Training defaults of the learned samplers", "",
             f"Recorded {report['date']} ({report['machine'].get('cpu', '')}). Selection seeds "
             f"{FIRST_SEED}..{FIRST_SEED + SEEDS - 1} against exact endpoints; ratio = learned / its own base "
             "(mean per-seed RMSE); every method but AMED at NFE 3-6 with its default base.", "",
             markdown_table(["setting", "cells", "geomean ratio", "worse than base", "neutral (base kept)",
                             "geomean vs first setting", "training s (all cells)"],
                            [[r["setting"], r["cells"], f"{r['geomean_ratio']:.3f}", r["worse_than_base"], r["neutral"],
                              f"{r['geomean_vs_first']:.3f}", f"{r['train_s']:.0f}"] for r in report["summary"]]), "",
             "## The teacher's own error (probe base: ipndm_v, time-quadratic, AFS)", "",
             markdown_table(["model", "NFE", "base RMSE"] + [f"teacher >= {s} steps" for s in report["teacher_steps"]],
                            [[k.rsplit(" @ ", 1)[0], k.rsplit(" @ ", 1)[1], f"{v[str(report['teacher_steps'][0])]['base']:.4f}"]
                             + [f"{v[str(s)]['teacher']:.1e} ({v[str(s)]['teacher_steps']} steps)"
                                for s in report["teacher_steps"]] for k, v in report["teacher"].items()]), "",
             "## Every cell (ratio to its own base; median per-seed ratio in brackets)", "",
             markdown_table(["model", "NFE", "method"] + [label(*s) for s in report["settings"]],
                            [k.split(" | ") + [f"{c[label(*s)]['ratio']:.3f} ({c[label(*s)]['median_ratio']:.2f})"
                                               for s in report["settings"]] for k, c in report["cells"].items()]), ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cells, teacher, steps_tried = {}, {}, sorted({s[0] for s in SETTINGS})
    for spec in args.models.split(","):
        model = load_model(spec)
        reference, _ = exact_endpoints(model, spec, FIRST_SEED, SEEDS)
        noise = seed_noise(range(FIRST_SEED, FIRST_SEED + SEEDS), model.shape, dtype=torch.float64)
        for nfe in (3, 4, 5, 6):
            teacher[f"{spec} @ {nfe}"] = {str(s): teacher_error(model, noise, reference, nfe, s) for s in steps_tried}
            for method in METHODS:
                cells[f"{spec} | {nfe} | {method}"] = {label(*s): cell(model, noise, reference, method, nfe, *s)
                                                       for s in SETTINGS}
                print(spec, nfe, method, {k: round(v["ratio"], 3) for k, v in cells[f"{spec} | {nfe} | {method}"].items()},
                      flush=True)
    report = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "selection_seeds": [FIRST_SEED, FIRST_SEED + SEEDS - 1],
              "settings": SETTINGS, "teacher_steps": steps_tried, "summary": summary(cells, SETTINGS),
              "teacher": teacher, "cells": cells}
    write_report("learned_training_defaults", report, markdown(report))
    return report


if __name__ == "__main__":
    main()
