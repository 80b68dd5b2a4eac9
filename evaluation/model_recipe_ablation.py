"""A small ablation of the bundled model's training recipe (issue: a bundled model worth measuring on).

    python -m evaluation.model_recipe_ablation --steps 2000 --device cuda     # minutes on a GPU
    python -m evaluation.model_recipe_ablation --steps 600 --recipes base,cosine --out /tmp/abl   # CPU smoke run

Each recipe trains the bundled U-Net from scratch for the same number of steps with
``diffsampler train model`` (its resumable training program; ``--out`` folders under
evaluation/.cache/recipes/), then is measured as ``evaluation.bundled_model_quality`` measures
the bundled model (DPM-Solver++ NFE 20, a class per image, the bundled classifier): class
accuracy and the classifier-feature Frechet distance to the test set, over the train-vs-test
distance at the same sample size.  Recipes change one thing at a time from the current one:

    base     the current recipe: base channels 16 (mult 1,2,4), batch 128, lr 1e-3 constant, EMA 0.999
    cosine   + cosine learning-rate decay to 0.1 x
    batch    + batch 256
    wide     + base channels 24 (about 1.5M parameters, 3 MB in float16)
    ema      + EMA decay 0.9995
    all      all of the above

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
    "ema": ["--ema-decay", "0.9995"],
    "all": ["--lr-schedule", "cosine", "--batch", "256", "--base-channels", "24", "--ema-decay", "0.9995"],
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from diffsampler.tools.train_unet import main as train_main
    from evaluation import bundled_model_quality
    rows, report = [], {"steps": args.steps, "device": args.device, "recipes": {}}
    for name in args.recipes.split(","):
        folder = CACHE / "recipes" / f"{name}_{args.steps}"
        t0 = time.time()
        train_main(["--dataset", "fashion-mnist", "--steps", str(args.steps), "--out", str(folder), "--device",
                    args.device, "--threads", str(args.threads), *RECIPES[name]])
        seconds = time.time() - t0
        quality = folder / "quality.json"
        bundled_model_quality.main(["--model", str(folder), "--per-class", str(args.per_class),
                                    "--guidance", "2.0", "--grid", "", "--out", str(quality)])
        q = json.loads(quality.read_text())
        real = q["reference"]["frechet_distance_train_vs_test_mean"]
        report["recipes"][name] = {"flags": RECIPES[name], "train_seconds": seconds, "quality": q}
        rows.append([name, " ".join(RECIPES[name]) or "(current)", q["runs"]["unguided"]["class_accuracy"],
                     q["runs"]["unguided"]["frechet_distance_vs_test"], round(q["runs"]["unguided"]["frechet_distance_vs_test"] / real, 2),
                     q["runs"]["guidance_2"]["class_accuracy"], round(seconds)])
    report["machine"] = machine()
    write_atomic(args.out / "model_recipe_ablation.json", json.dumps(report, indent=1, default=str).encode() + b"\n")
    md = ["# Bundled-model recipe ablation", "", f"{args.steps} steps each on {args.device}; recorded "
          f"{report['machine']['date']}. DPM-Solver++ NFE 20, {args.per_class * 10} images.", "",
          markdown_table(["recipe", "flags", "accuracy", "FD to test", "FD / real", "accuracy (guidance 2)",
                          "train s"], rows), ""]
    write_atomic(args.out / "model_recipe_ablation.md", "\n".join(md).encode())
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
