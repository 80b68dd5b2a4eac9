"""A small ablation of the bundled model's training recipe (issue: a bundled model worth measuring on).

    python -m evaluation.model_recipe_ablation --steps 2000 --device cuda     # minutes on a GPU
    python -m evaluation.model_recipe_ablation --steps 600 --recipes base,cosine --out /tmp/abl   # CPU smoke run

Each recipe trains the bundled U-Net from scratch for the same number of steps with
``diffsampler train model`` (its resumable training program; ``--out`` folders under
evaluation/.cache/recipes/, so an interrupted ablation continues and a finished recipe is not
trained again), then is measured as ``evaluation.bundled_model_quality`` measures the bundled
model (DPM-Solver++ NFE 20, 100 images per class, the bundled classifier): class accuracy and the
classifier-feature Frechet distance to the test set, over the train-vs-test distance at the same
sample size (a measurement is reused only for the same weights and sample count).  Recipes change
one thing at a time from the first bundled model's (``fashion-mnist-v1``):

    base     v1's recipe: base channels 16 (mult 1,2,4), batch 128, lr 1e-3 constant, EMA 0.999
    cosine   + cosine learning-rate decay to 0.1 x
    batch    + batch 256
    wide     + base channels 24 (about 1.5M parameters, 3 MB in float16)
    current  + cosine + batch 256: the recipe of the bundled ``fashion-mnist`` (its --ema-decay
             0.9995 is left out: below 8,990 steps the EMA warm-up (1+s)/(10+s) sets the decay,
             so 0.999 and 0.9995 train the same weights bit for bit)
    all      current + base channels 24 (not in the default list: 4x base's time per step)

Results: results/model_recipe_ablation.json and .md (the chosen recipe's card cites them).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from diffsampler.fileio import write_atomic
from evaluation.common import CACHE, RESULTS, machine, markdown_table

RECIPES = {
    "base": [],
    "cosine": ["--lr-schedule", "cosine"],
    "batch": ["--batch", "256"],
    "wide": ["--base-channels", "24"],
    "current": ["--lr-schedule", "cosine", "--batch", "256"],
    "all": ["--lr-schedule", "cosine", "--batch", "256", "--base-channels", "24"],
}
DEFAULT_RECIPES = ("base", "cosine", "batch", "wide", "current")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default=",".join(DEFAULT_RECIPES), help=f"any of {', '.join(RECIPES)}")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from diffsampler.tools.train_unet import main as train_main
    from evaluation import bundled_model_quality
    rows, report = [], {"steps": args.steps, "device": args.device, "recipes": {}}
    names = args.recipes.split(",")
    unknown = sorted(set(names) - set(RECIPES))
    if unknown:
        parser.error(f"unknown recipe(s) {', '.join(unknown)}; the recipes are {', '.join(RECIPES)}")
    for name in names:
        folder = CACHE / "recipes" / f"{name}_{args.steps}"
        t0 = time.time()
        train_main(["--dataset", "fashion-mnist", "--steps", str(args.steps), "--out", str(folder), "--device",
                    args.device, "--threads", str(args.threads), *RECIPES[name]])
        config = json.loads((folder / "config.json").read_text())
        measured = folder / "ablation_quality.json"
        key = {"weights_sha256": config["weights_sha256"], "per_class": args.per_class}
        cached = json.loads(measured.read_text()) if measured.exists() else {}
        if {k: cached.get(k) for k in key} == key:
            q = cached["quality"]
        else:
            quality = folder / "quality.json"
            bundled_model_quality.main(["--model", str(folder), "--per-class", str(args.per_class),
                                        "--guidance", "2.0", "--grid", "", "--threads", str(args.threads),
                                        "--out", str(quality)])
            q = json.loads(quality.read_text())
            write_atomic(measured, json.dumps({**key, "quality": q}, indent=1).encode() + b"\n")
        real = q["reference"]["frechet_distance_train_vs_test_mean"]
        seconds = config["training_seconds"]
        report["recipes"][name] = {"flags": RECIPES[name], "train_seconds": seconds,
                                   "wall_seconds_this_run": round(time.time() - t0, 1),
                                   "machine": config["machine"], "final_loss": config["loss_curve"][-1],
                                   "quality": q}
        unguided = q["runs"]["unguided"]
        rows.append([name, " ".join(RECIPES[name]) or "(v1)", unguided["class_accuracy"],
                     unguided["frechet_distance_vs_test"], round(unguided["frechet_distance_vs_test"] / real, 2),
                     q["runs"]["guidance_2"]["class_accuracy"], config["loss_curve"][-1][1], round(seconds)])
    report["machine"] = machine()
    write_atomic(args.out / "model_recipe_ablation.json", json.dumps(report, indent=1, default=str).encode() + b"\n")
    md = ["# Bundled-model recipe ablation", "", f"{args.steps} steps each on {args.device}; recorded "
          f"{report['machine']['date']}. DPM-Solver++ NFE 20, {args.per_class * 10} images.", "",
          markdown_table(["recipe", "flags", "accuracy", "FD to test", "FD / real", "accuracy (guidance 2)",
                          "last loss", "train s"], rows), ""]
    write_atomic(args.out / "model_recipe_ablation.md", "\n".join(md).encode())
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
