"""Sampling throughput of bundled models on this CPU: what a user waits for.

    python -m evaluation.bundled_throughput          # fashion-mnist-v1, fashion-mnist-v2 and fashion-mnist
    python -m evaluation.bundled_throughput --models fashion-mnist --threads 1

For each model and thread count: the README's first command's work (64 class-conditional images at
NFE 5 with the default solver, through ``diffsampler.sample``) and 250 images at NFE 20 with
DPM-Solver++ (the quality check's sampler), best of ``--repeats`` timed runs after one warm-up, as
images per second and model evaluations per second.  The machine's load average is recorded with
it: numbers taken while another job shares the cores are not comparable.

Results: results/bundled_throughput.json and .md.
"""
from __future__ import annotations

import argparse
import time

import torch

from diffsampler import sample
from diffsampler.defaults import DEFAULT_SOLVER
from diffsampler.models.unet import count_parameters
from diffsampler.seeds import seed_noise
from evaluation.common import labels_cond, load_model, machine, markdown_table, write_report

WORKLOADS = {f"README first command (64 images, NFE 5, default solver: {DEFAULT_SOLVER})": (64, {"nfe": 5}),
             "quality check (250 images, NFE 20, dpmpp)": (250, {"nfe": 20, "solver": "dpmpp"})}


def best_seconds(model, images: int, request: dict, repeats: int) -> float:
    cond = labels_cond(model)
    seeds = list(range(images))
    noise = seed_noise(seeds, model.shape)
    run = lambda: sample(model, noise, cond=cond(seeds) if cond else None, **request)
    run()                                                        # warm-up (allocator, lazy inits)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="fashion-mnist-v1,fashion-mnist-v2,fashion-mnist")
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    rows, report = [], {"runs": []}
    for spec in a.models.split(","):
        model = load_model(spec)
        params = count_parameters(model)
        for threads in (int(t) for t in a.threads.split(",")):
            torch.set_num_threads(threads)
            for name, (images, request) in WORKLOADS.items():
                seconds = best_seconds(model, images, request, a.repeats)
                run = {"model": spec, "parameters": params, "threads": threads, "workload": name, "images": images,
                       **request, "seconds": round(seconds, 3), "images_per_s": round(images / seconds, 1),
                       "evaluations_per_s": round(images * request["nfe"] / seconds, 1)}
                report["runs"].append(run)
                rows.append([spec, f"{params:,}", threads, name, run["seconds"], run["images_per_s"],
                             run["evaluations_per_s"]])
                print(run, flush=True)
    report["machine"] = machine()
    md = ["# Bundled-model sampling throughput", "",
          f"Recorded {report['machine']['date']} on {report['machine']['cpu']} ({report['machine']['cpu_count']} "
          f"CPUs, load average {report['machine']['load_average']}); best of {a.repeats} runs.", "",
          markdown_table(["model", "parameters", "threads", "workload", "seconds", "images/s", "image evaluations/s"],
                         rows), ""]
    write_report("bundled_throughput", report, "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
