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


def rank_and_world():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def barrier():
    if rank_and_world()[1] > 1:
        torch.distributed.barrier()


def remove_stale_temporaries(outdir: Path) -> int:
    """Delete temporary files a killed run left behind (our atomic writes' ``.NAME.*.tmp``)."""
    stale = [p for p in outdir.rglob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


@dataclass
class SampleJob:
    denoiser: Any
    shape: Sequence[int]
    request: Dict[str, Any]                      # keyword arguments of sample(): solver, sigmas, afs, ...
    seeds: List[int]
    outdir: Path
    batch: int = 64
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    cond: Optional[Callable[[List[int]], Dict[str, Any]]] = None      # seeds -> conditioning
    decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None   # e.g. VAE: latents -> images in [-1, 1]
    settings: Dict[str, Any] = field(default_factory=dict)
    write_grid: bool = True
    npz: Optional[Path] = None


def run(job: SampleJob, progress: bool = True) -> Dict[str, Any]:
    """Sample every seed of ``job`` not yet on disk; return a summary (images, nfe, seconds)."""
    rank, world = rank_and_world()
    outdir = Path(job.outdir)
    if rank == 0:
        outdir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(outdir)
        write_atomic(outdir / "settings.json", json.dumps(job.settings, indent=2, default=str).encode() + b"\n")
    barrier()
    todo = [s for s in job.seeds if not image_path(outdir, s).exists()]
    mine = todo[rank::world]
    start, nfe, done = time.perf_counter(), None, 0
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(job.seeds), initial=len(job.seeds) - len(todo), unit="img", desc="sampling")
    for k in range(0, len(mine), job.batch):
        chunk = mine[k:k + job.batch]
        noise = seed_noise(chunk, tuple(job.shape), dtype=job.dtype, device=job.device)
        cond = job.cond(chunk) if job.cond is not None else None
        result = sample(job.denoiser, noise, cond=cond, **job.request)
        images = job.decode(result.samples) if job.decode is not None else result.samples
        for seed, pixels in zip(chunk, to_uint8(images)):
            save_png(image_path(outdir, seed), pixels)
        nfe, done = result.nfe, done + len(chunk)
        if bar is not None:
            bar.update(len(chunk) * world)
            bar.set_postfix(nfe=nfe, img_per_s=f"{done * world / (time.perf_counter() - start):.1f}")
    if bar is not None:
        bar.close()
    barrier()
    if rank == 0:
        if job.write_grid:
            write_atomic(outdir / "grid.png", png_bytes(grid(load_images(outdir, job.seeds[:256]))))
        if job.npz is not None:
            save_npz(Path(job.npz), load_images(outdir, job.seeds), job.seeds)
    return {"images": len(job.seeds), "new": len(todo), "nfe": nfe, "seconds": time.perf_counter() - start}


def load_images(outdir: Path, seeds: Sequence[int]) -> np.ndarray:
    """(N, H, W, C) uint8 images of the given seeds."""
    images = [np.array(Image.open(image_path(outdir, s))) for s in seeds]
    return np.stack([im if im.ndim == 3 else im[..., None] for im in images])


def save_npz(path: Path, images: np.ndarray, seeds: Sequence[int]) -> None:
    """EDM-style ``.npz``: ``samples`` (N, H, W, C) uint8 plus the ``seeds``; written atomically."""
    import io
    buffer = io.BytesIO()
    np.savez(buffer, samples=images, seeds=np.asarray(seeds, dtype=np.int64))
    write_atomic(path, buffer.getvalue())
