"""Sampling runs to files: many seeds, batches, resumable, atomic, one or many processes.

Every seed gets its own noise (and its own random class label), so each image depends only on its
seed.  Images are written as ``outdir/<thousands>/<seed>.png`` through a temporary file and an
atomic rename, so a killed run leaves no partial image; a rerun skips the seeds already written and
ends with the identical set.  Under ``torchrun`` the seeds still to do are split across ranks
(gloo on CPU, nccl on GPU); rank 0 writes the grid, the ``.npz`` and the settings after a barrier.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .distributed import barrier, rank_and_world
from .fileio import write_atomic
from .images import grid, png_bytes, save_png, to_uint8
from .sampling import sample
from .seeds import seed_noise

LABEL_STREAM = 0x5EED_0000


def image_path(outdir: Path, seed: int) -> Path:
    return outdir / f"{seed - seed % 1000:06d}" / f"{seed:06d}.png"


def seed_labels(seeds: Sequence[int], num_classes: int) -> torch.Tensor:
    """A random class per seed, drawn from the seed's own generator (independent of its noise)."""
    return torch.tensor([int(torch.randint(num_classes, (1,), generator=torch.Generator().manual_seed(LABEL_STREAM + s)))
                         for s in seeds], dtype=torch.int64)


def one_hot_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"class index out of range: the model has classes 0..{num_classes - 1}, got {labels.tolist()}")
    return torch.nn.functional.one_hot(labels, num_classes).to(torch.float32)


def remove_stale_temporaries(outdir: Path) -> int:
    """Delete temporary files a killed run left behind (our atomic writes' ``.NAME.*.tmp``)."""
    stale = [p for p in outdir.rglob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


class StaleRunError(ValueError):
    """The output folder holds images made with other settings."""


@dataclass
class SampleJob:
    denoiser: Any
    shape: Sequence[int]
    plan: Any                                    # the resolved request (diffsampler.plan.Plan)
    seeds: List[int]
    outdir: Path
    batch: int = 64
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    cond: Optional[Callable[[List[int]], Dict[str, Any]]] = None      # seeds -> conditioning
    labels: Optional[Callable[[List[int]], Optional[List[int]]]] = None   # seeds -> class labels (recorded)
    decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None   # e.g. VAE: latents -> images in [-1, 1]
    settings: Dict[str, Any] = field(default_factory=dict)
    image_settings: Sequence[str] = ()           # the settings keys that determine the images
    write_grid: bool = True
    npz: Optional[Path] = None
    overwrite: bool = False


def _flatten(value, prefix=""):
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): value}


def check_reusable(outdir: Path, settings: Dict[str, Any], keys: Sequence[str]) -> None:
    """Refuse to add to a folder whose images were made with other image-determining settings (or
    whose settings are unknown), naming what differs and how to proceed."""
    if not outdir.exists():
        return
    has_images = any(outdir.glob("[0-9]" * 6 + "/*.png"))
    recorded_path = outdir / "settings.json"
    if not recorded_path.is_file():
        if has_images:
            raise StaleRunError(f"{outdir} holds images but no settings.json, so it is unknown how they were made: "
                                "sample into a new folder, or pass --overwrite to delete them first")
        return
    try:
        recorded = json.loads(recorded_path.read_text())
    except json.JSONDecodeError:
        raise StaleRunError(f"{recorded_path} is not readable JSON: sample into a new folder, or pass --overwrite") from None
    if not has_images:
        return
    old = _flatten({k: recorded.get(k) for k in keys})
    new = _flatten(json.loads(json.dumps({k: settings.get(k) for k in keys}, default=str)))
    differ = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if differ:
        shown = "; ".join(f"{k}: {_short(old.get(k))} -> {_short(new.get(k))}" for k in differ[:4])
        more = f" (and {len(differ) - 4} more)" if len(differ) > 4 else ""
        raise StaleRunError(f"{outdir} holds images made with other settings ({shown}{more}); a rerun may only add "
                            "seeds to a run with the same settings: sample into a new folder, or pass --overwrite "
                            "to delete its images first")


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def clear_run(outdir: Path) -> None:
    """Delete what a sampling run writes in ``outdir`` (seed folders of PNGs, grid, settings)."""
    for folder in outdir.glob("[0-9]" * 6):
        if folder.is_dir():
            for png in folder.glob("*.png"):
                png.unlink()
            if not any(folder.iterdir()):
                folder.rmdir()
    for name in ("grid.png", "settings.json"):
        (outdir / name).unlink(missing_ok=True)


def run(job: SampleJob, progress: bool = True) -> Dict[str, Any]:
    """Sample every seed of ``job`` not yet on disk; return a summary (images, nfe measured, seconds).

    A folder that already holds images is only added to when its settings.json records the same
    image-determining settings (``job.image_settings``); otherwise :class:`StaleRunError`, unless
    ``job.overwrite`` (its images are deleted first)."""
    rank, world = rank_and_world()
    outdir = Path(job.outdir)
    if rank == 0:
        if job.overwrite:
            clear_run(outdir)
        check_reusable(outdir, job.settings, job.image_settings)
    barrier()
    settings = dict(job.settings)
    if job.labels is not None:
        settings["class_labels"] = job.labels(job.seeds)
    if rank == 0:
        outdir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(outdir)
        write_atomic(outdir / "settings.json", json.dumps(settings, indent=2, default=str).encode() + b"\n")
    barrier()
    todo = [s for s in job.seeds if not image_path(outdir, s).exists()]
    mine = todo[rank::world]
    start, nfe, done = time.perf_counter(), None, 0
    made: Dict[int, np.ndarray] = {}
    bar = None
    if progress and rank == 0:
        from .progress import bar as progress_bar
        bar = progress_bar(total=len(job.seeds), initial=len(job.seeds) - len(todo), unit="img", desc="sampling")
    for k in range(0, len(mine), job.batch):
        chunk = mine[k:k + job.batch]
        noise = seed_noise(chunk, tuple(job.shape), dtype=job.dtype, device=job.device)
        cond = job.cond(chunk) if job.cond is not None else None
        result = sample(job.denoiser, noise, cond=cond, plan=job.plan)
        images = job.decode(result.samples) if job.decode is not None else result.samples
        for seed, pixels in zip(chunk, to_uint8(images)):
            save_png(image_path(outdir, seed), pixels)
            made[seed] = pixels
        nfe, done = result.nfe, done + len(chunk)
        if bar is not None:
            bar.update(len(chunk) * world)
            bar.set_postfix(nfe=nfe, img_per_s=f"{done * world / (time.perf_counter() - start):.1f}")
    if bar is not None:
        bar.close()
    barrier()
    if rank == 0:
        if job.write_grid:
            write_atomic(outdir / "grid.png", png_bytes(grid(load_images(outdir, job.seeds[:256], made))))
        if job.npz is not None:
            save_npz(Path(job.npz), load_images(outdir, job.seeds, made), job.seeds, settings.get("class_labels"))
    return {"images": len(job.seeds), "new": len(todo), "nfe": nfe, "seconds": time.perf_counter() - start}


def load_images(outdir: Path, seeds: Sequence[int], known: Optional[Dict[int, np.ndarray]] = None) -> np.ndarray:
    """(N, H, W, C) uint8 images of the given seeds (those in ``known`` are not read back)."""
    known = known or {}
    images = [known[s] if s in known else np.array(Image.open(image_path(outdir, s))) for s in seeds]
    return np.stack([im if im.ndim == 3 else im[..., None] for im in images])


def save_npz(path: Path, images: np.ndarray, seeds: Sequence[int], labels: Optional[Sequence[int]] = None) -> None:
    """EDM-style ``.npz``: ``samples`` (N, H, W, C) uint8, the ``seeds`` and, for class-conditional
    runs, each seed's class ``labels``; written atomically."""
    import io
    buffer = io.BytesIO()
    arrays = {"samples": images, "seeds": np.asarray(seeds, dtype=np.int64)}
    if labels is not None:
        arrays["labels"] = np.asarray(labels, dtype=np.int64)
    np.savez(buffer, **arrays)
    write_atomic(path, buffer.getvalue())
