"""What every benchmark shares: models by spec, per-seed labels, ground truth (exact ODE endpoints
of the analytic models, converged samples of the bundled network, both cached), errors, FID with
the bundled classifier, and the record of the machine a run was made on.

Run the benchmarks as modules from the repository root: ``python -m evaluation.endpoint_error``.
"""
from __future__ import annotations

import datetime as _dt
import io
import json
import os
import time
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

import diffsampler
from diffsampler import sample
from diffsampler.fileio import write_atomic
from diffsampler.machine import cpu_name
from diffsampler.generate import one_hot_labels, seed_labels
from diffsampler.images import to_uint8
from diffsampler.metrics import CLASSIFIER, fid, pipeline
from diffsampler.metrics.sources import ImageArray
from diffsampler.models.identity import weights_hash
from diffsampler.models.specs import load_model  # noqa: F401  (the benchmarks load models by spec)
from diffsampler.reference import solve_ode
from diffsampler.seeds import seed_noise

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CACHE = HERE / ".cache"
REFERENCE = pipeline.BUNDLED_REFERENCE
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


# --- models and conditioning ----------------------------------------------------------------------

def bundled_model(name: str = "fashion-mnist"):
    return load_model(name)


def drop_stale_bundled(report: dict, sections: Sequence[str], model=None) -> list:
    """Make a resumed report safe to extend: if its bundled-model ``sections`` (a name, or a prefix
    ending in ``*``) were measured on other weights than today's bundled model (or on unrecorded
    weights), drop them, so a rerun after the model changed never mixes old rows with new ones.
    Records today's weights hash in ``report["bundled_weights"]``; returns the dropped names."""
    current = weights_hash(model if model is not None else bundled_model())
    dropped = []
    if report.get("bundled_weights") != current:
        def stale(key):
            return any(key.startswith(s[:-1]) if s.endswith("*") else key == s for s in sections)
        dropped = [key for key in list(report) if stale(key)]
        for key in dropped:
            del report[key]
    report["bundled_weights"] = current
    return dropped


def labels_cond(model):
    """Conditioning of a batch of seeds as ``diffsampler sample`` draws it: a random class per seed
    on a class-conditional model, nothing otherwise."""
    if not model.num_classes:
        return None
    return lambda seeds: {"class_labels": one_hot_labels(seed_labels(seeds, model.num_classes), model.num_classes)}


def slug(spec: str) -> str:
    return spec.replace(":", "-").replace("/", "_")


# --- ground truth ---------------------------------------------------------------------------------

def _cached(path: Path, key: dict, compute):
    if path.is_file():
        blob = torch.load(path)
        if blob.get("key") == key:
            return blob["value"]
    value = compute()
    buffer = io.BytesIO()
    torch.save({"key": key, "value": value}, buffer)
    write_atomic(path, buffer.getvalue())
    return value


def exact_endpoints(model, spec: str, first_seed: int, count: int, tol: float = 1e-9, chunk: int = 64,
                    cache_dir: Path = CACHE) -> Tuple[torch.Tensor, float]:
    """Exact ODE endpoints (adaptive 8th-order solve, float64) of seeds first_seed.. for an
    analytic model, cached per chunk; returns (endpoints, seconds spent solving now)."""
    parts, seconds = [], 0.0
    for start in range(first_seed, first_seed + count, chunk):
        stop = min(first_seed + count, start + chunk)

        def solve(start=start, stop=stop):
            nonlocal seconds
            noise = seed_noise(range(start, stop), model.shape, dtype=torch.float64)
            t0 = time.perf_counter()
            x = solve_ode(model, noise * SIGMA_MAX, SIGMA_MAX, SIGMA_MIN, tol=tol)
            seconds += time.perf_counter() - t0
            return x
        key = {"spec": spec, "tol": tol, "seeds": [start, stop]}
        parts.append(_cached(cache_dir / f"ref_{slug(spec)}_tol{tol:g}_seeds{start}-{stop - 1}.pt", key, solve))
    return torch.cat(parts), seconds


def converged(model, seeds: int, solver: str = "heun", nfe: int = 160, chunk: int = 100, first_seed: int = 0,
              name: str = "fashion-mnist") -> torch.Tensor:
    """Samples of seeds first_seed.. (with their labels) by ``solver`` at a large ``nfe`` on the
    default schedule, cached: the reference that RMSE-to-converged rows compare with."""
    def compute():
        cond, parts = labels_cond(model), []
        for k in range(first_seed, first_seed + seeds, chunk):
            batch = list(range(k, min(first_seed + seeds, k + chunk)))
            parts.append(sample(model, seed_noise(batch, model.shape), solver=solver, nfe=nfe,
                                cond=cond(batch) if cond else None).samples.to(torch.float64))
        return torch.cat(parts)
    last = first_seed + seeds - 1
    key = {"model": name, "weights": weights_hash(model), "solver": solver, "nfe": nfe, "seeds": [first_seed, last]}
    suffix = f"seeds0-{last}" if first_seed == 0 else f"seeds{first_seed}-{last}"
    return _cached(CACHE / f"converged_{name}_{solver}_nfe{nfe}_{suffix}.pt", key, compute)


def rmse_per_seed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.to(torch.float64) - b.to(torch.float64)).flatten(1).pow(2).mean(1).sqrt()


# --- FID with the bundled classifier ----------------------------------------------------------------

def features(model, images: int, first_seed: int = 0, batch: int = 250, **sample_kwargs):
    """Bundled-classifier features of seeds first_seed..first_seed+images-1 (with their labels),
    the sampling time in seconds and the measured NFE."""
    cond, pixels = labels_cond(model), []
    t0 = time.perf_counter()
    for k in range(first_seed, first_seed + images, batch):
        chunk = list(range(k, min(first_seed + images, k + batch)))
        out = sample(model, seed_noise(chunk, model.shape), cond=cond(chunk) if cond else None, **sample_kwargs)
        pixels.append(to_uint8(out.samples))
    seconds = time.perf_counter() - t0
    return pipeline.features(ImageArray(np.concatenate(pixels), "samples"), CLASSIFIER), seconds, out.nfe


def fid_of(feats) -> float:
    """FID of features against the committed reference statistics."""
    return fid.frechet_distance(fid.statistics(feats), fid.load_reference(REFERENCE))


def paired_fid_difference(feats, base, draws: int = 200, seed: int = 0) -> dict:
    """FID(feats) - FID(base) for images of the same seeds: mean and std over ``draws`` paired
    bootstrap resamples (the same resampled indices for both), and the fraction where feats is lower."""
    gen = np.random.default_rng(seed)
    picks = [gen.integers(0, len(base), len(base)) for _ in range(draws)]
    diffs = np.array([fid_of(feats[i]) - fid_of(base[i]) for i in picks])
    return {"mean": float(diffs.mean()), "std": float(diffs.std()), "p_lower": float((diffs < 0).mean())}


def score(model, images: int, batch: int = 250, **sample_kwargs):
    """FID (bundled classifier features, vs the training split) of seeds 0..images-1, with timings."""
    t0 = time.perf_counter()
    feats, sample_seconds, nfe = features(model, images, 0, batch, **sample_kwargs)
    extract_seconds = time.perf_counter() - t0 - sample_seconds
    return {"fid": fid_of(feats), "nfe": nfe, "sample_images_per_s": images / sample_seconds,
            "feature_images_per_s": images / extract_seconds}


# --- records --------------------------------------------------------------------------------------

def machine() -> Dict[str, object]:
    """Where and when a run was made (machines differ between sessions, and are shared)."""
    return {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_name(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "diffsampler": diffsampler.__version__, "load_average": list(os.getloadavg())}


def write_report(name: str, report: dict, markdown: Optional[str] = None, folder: Path = RESULTS) -> None:
    """``results/NAME.json`` (and ``NAME.md``), written atomically."""
    write_atomic(folder / f"{name}.json", json.dumps(report, indent=1, default=str).encode() + b"\n")
    if markdown is not None:
        write_atomic(folder / f"{name}.md", markdown.encode())


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cell = lambda v: str(v).replace("|", "/")          # labels like "unipc | logsnr" must not split cells
    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)
