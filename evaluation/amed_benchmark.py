"""AMED-Solver and AMED-Plugin against their base solvers, with and without GITS schedules.

Rows at NFE 3..6 (AMED makes two evaluations per step, so odd NFEs use AFS, as in the paper):

* ``dpm2`` / ``ipndm`` / ``dpmpp``: the base solvers on their default schedules, the better of
  with and without AFS (dpm2 only exists with AFS at odd NFE);
* ``/pf`` (odd NFE): the same student with a plain first step (one evaluation at sigma_max, no
  intermediate point) instead of AFS;
* ``amed``: AMED-Solver; ``amed-ipndm`` / ``amed-dpmpp``: AMED-Plugin on those solvers; each
  trained with the package defaults (teacher dpm2 with at least 8 teacher steps, 40 batches of 32, Adam 1e-2)
  on seeds from 1,000,000 on, evaluated on seeds 0..N-1;
* ``+gits``: the same on a GITS schedule (teacher iPNDM, 61 points, 256 warm-up seeds), made
  for the student's NFE rule (``--solver amed`` for AMED, the base's own for the base solvers).

Sections:
* ``--analytic``: endpoint RMSE to the exact endpoint on the digits optimal denoiser (256 seeds,
  reference endpoints shared with endpoint_error.py's cache);
* ``--bundled``: the bundled Fashion-MNIST model: FID with the bundled classifier extractor
  (``--images``) and RMSE to a converged sample of the same seed (Heun NFE 160, cached), and the
  training time of every predictor on this CPU.  Written after every row; a rerun resumes.

    python -m evaluation.amed_benchmark --analytic
    python -m evaluation.amed_benchmark --bundled --images 1000
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import time
from pathlib import Path

import torch

import diffsampler
from diffsampler import amed, gits, sample
from diffsampler.fileio import write_atomic
from diffsampler.models.specs import load_model
from diffsampler.seeds import seed_noise
from diffsampler.solvers import get_solver

from evaluation.common import (HERE, bundled_model, converged, drop_stale_bundled, exact_endpoints, features, fid_of,
                               labels_cond, paired_fid_difference, rmse_per_seed, score)

NFES = (3, 4, 5, 6)
BASES = ("dpm2", "ipndm", "dpmpp")
STUDENTS = {"amed": "amed", "amed-ipndm": "ipndm", "amed-dpmpp": "dpmpp"}
GITS_SEED = 100_000


def rmse(out, ref):
    return float(rmse_per_seed(out, ref).mean())


def runs(model, nfe, warm=None, cond=None, log=print, done=()):
    """(label, sample kwargs, train seconds) for every row at this NFE not in ``done``."""
    afs = nfe % 2 == 1
    for base in BASES:
        options = [a for a in (False, True) if nfe in get_solver(base).valid_nfes(a)]
        if base not in done:
            yield base, [dict(solver=base, nfe=nfe, afs=a) for a in options], None
        if warm is not None and base + "+gits" not in done:
            yield base + "+gits", [dict(solver=base, schedule=warm.schedule(nfe, base, afs=a), afs=a) for a in options], None
    firsts = (False, True) if afs else (False,)    # odd NFE: AFS (paper) or a plain first step
    amed_gits = {}                          # one GITS schedule (and AFS search) serves every AMED student
    for label, student in STUDENTS.items():
        for plain_first in firsts:
            for tuned in ((False, True) if warm is not None else (False,)):
                row = label + ("/pf" if plain_first else "") + ("+gits" if tuned else "")
                if row in done:
                    continue
                if tuned and plain_first not in amed_gits:
                    amed_gits[plain_first] = warm.schedule(nfe, "amed", afs=afs and not plain_first,
                                                           solver_options={"plain_first": plain_first})
                t0 = time.perf_counter()
                predictor = amed.train(model, solver=student, nfe=nfe, afs=afs and not plain_first,
                                       plain_first=plain_first, schedule=amed_gits.get(plain_first) if tuned else None,
                                       cond=cond)
                seconds = time.perf_counter() - t0
                log(f"  trained {row} NFE {nfe} in {seconds:.1f} s (loss {predictor.settings['final_loss']:.4f})")
                yield row, [dict(amed=predictor)], seconds


def analytic_section(spec, seeds, log):
    model = load_model(spec)
    ref, _ = exact_endpoints(model, spec, 0, seeds)
    noise = seed_noise(range(seeds), model.shape, dtype=torch.float64)
    warm = gits.warm_up(model, model.shape, warmup=256, first_seed=GITS_SEED, dtype=torch.float64, keep_endpoints=True)
    rows = {}
    for nfe in NFES:
        for label, requests, seconds in runs(model, nfe, warm, log=log):
            error = min(rmse(sample(model, noise, **kw).samples, ref) for kw in requests)
            rows.setdefault(label, {})[str(nfe)] = {"rmse": error, "train_s": seconds}
            log(f"{spec} NFE {nfe} {label}: rmse {error:.4f}")
    return rows


def bundled_section(images, log, rows, save, gits_too=True, nfes=NFES):
    """Fills ``rows`` (resuming the rows already there) and calls ``save()`` after each one."""
    model = bundled_model()
    cond = labels_cond(model)
    seeds = list(range(256))
    noise, c = seed_noise(seeds, model.shape), cond(seeds)
    ref = converged(model, len(seeds), "heun", 160)
    warm = None
    if gits_too:
        warm = gits.warm_up(model, model.shape, warmup=256, first_seed=GITS_SEED, cond=cond, keep_endpoints=True,
                            batch=128)
    for nfe in nfes:
        done = {label for label, per in rows.items() if str(nfe) in per}
        for label, requests, seconds in runs(model, nfe, warm, cond, log, done):
            best = None
            for kw in requests:
                error = rmse(sample(model, noise, cond=c, **kw).samples, ref)
                if best is None or error < best[0]:
                    best = (error, kw)
            fid = score(model, images, **best[1])["fid"]
            rows.setdefault(label, {})[str(nfe)] = {"rmse": best[0], "fid": fid, "train_s": seconds,
                                               "afs": bool(best[1].get("afs", False))}
            log(f"bundled NFE {nfe} {label}: rmse {best[0]:.4f} fid {fid:.3f}"
                + (f" (trained {seconds:.0f} s)" if seconds else ""))
            save()
    return rows


def fid_check_section(nfe, images, log, rows):
    """FID on ``images`` images of each AMED student against its base at one NFE, paired (same
    seeds) with a bootstrap of the difference: the 500-image table's claims at a size where FID
    noise is ~0.1.  Odd NFEs use the plain first step.  Fills ``rows`` (resumes)."""
    model = bundled_model()
    cond = labels_cond(model)
    plain_first = nfe % 2 == 1
    for label, student in STUDENTS.items():
        if label in rows:
            continue
        base = "dpm2" if student == "amed" else student
        base_kw = dict(solver=base, nfe=nfe, afs=nfe not in get_solver(base).valid_nfes(False))
        t0 = time.perf_counter()
        predictor = amed.train(model, solver=student, nfe=nfe, plain_first=plain_first, cond=cond)
        seconds = time.perf_counter() - t0
        ours, theirs = features(model, images, amed=predictor)[0], features(model, images, **base_kw)[0]
        rows[label] = {"base": base, "base_afs": base_kw["afs"], "plain_first": plain_first, "fid": fid_of(ours),
                       "fid_base": fid_of(theirs), "diff": paired_fid_difference(ours, theirs), "train_s": seconds}
        log(f"FID check NFE {nfe} {label}: {rows[label]['fid']:.3f} vs {base} {rows[label]['fid_base']:.3f} "
            f"(diff {rows[label]['diff']['mean']:+.3f} +- {rows[label]['diff']['std']:.3f})")
        yield


def markdown(report):
    lines = ["# AMED-Solver and AMED-Plugin vs their base solvers", "",
             f"Recorded {report['date']} on {report['machine']}; {report['threads']} thread(s), torch {report['torch']}.", ""]
    sections = [("analytic", "Endpoint RMSE to the exact endpoint, gmm:digits (256 seeds)", ("rmse",)),
                ("bundled", f"Bundled Fashion-MNIST model: FID (bundled classifier, {report.get('images')} images) "
                            "and RMSE to a converged sample (Heun NFE 160, 256 seeds)", ("fid", "rmse"))]
    for key, title, metrics in sections:
        rows = report.get(key)
        if not rows:
            continue
        for metric in metrics:
            lines += [f"## {title}: {metric}", "", "| method | " + " | ".join(f"NFE {n}" for n in NFES) + " |",
                      "|---|" + "---|" * len(NFES)]
            for label, per in rows.items():
                cells = []
                for n in NFES:
                    entry = per.get(str(n))
                    cells.append("-" if entry is None else f"{entry[metric]:.4f}" if metric == "rmse" else f"{entry[metric]:.3f}")
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
            lines.append("")
        times = [(label, n, e["train_s"]) for label, per in rows.items() for n, e in per.items() if e.get("train_s")]
        if times:
            lines += [f"Training time ({key}): " + ", ".join(f"{l} NFE {n}: {s:.0f} s" for l, n, s in times), ""]
    for nfe, check in sorted(report.get("fid_check", {}).items()):
        lines += [f"## FID check at NFE {nfe}: {check['images']} images, paired with the base solver", "",
                  "Seeds 0..N-1 for both; `diff`: FID(AMED) - FID(base), mean +- std over 200 paired bootstrap "
                  "resamples, and the fraction of resamples where AMED is lower.", "",
                  "| student | first step | FID | base | base FID | diff |", "|---|---|---|---|---|---|"]
        for label, row in check["rows"].items():
            d = row["diff"]
            lines.append(f"| {label} | {'plain' if row['plain_first'] else 'AFS' if int(nfe) % 2 else 'model'} | "
                         f"{row['fid']:.3f} | {row['base']}{' (AFS)' if row['base_afs'] else ''} | "
                         f"{row['fid_base']:.3f} | {d['mean']:+.3f} +- {d['std']:.3f} ({d['p_lower']:.2f}) |")
        lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--analytic", action="store_true")
    parser.add_argument("--bundled", action="store_true")
    parser.add_argument("--no-gits", action="store_true", help="Bundled section without the GITS rows.")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--nfes", default="3,4,5,6", help="Bundled section: the NFEs to run (rows resume).")
    parser.add_argument("--seeds", type=int, default=256)
    parser.add_argument("--fid-check", type=int, default=None, metavar="NFE",
                        help="Paired FID of each AMED student vs its base at this NFE on --check-images images.")
    parser.add_argument("--check-images", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "amed.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = json.loads(args.out.read_text()) if args.out.exists() else {}
    if args.bundled or args.fid_check is not None:
        for key in drop_stale_bundled(report, ["bundled", "fid_check", "images"]):
            print(f"dropped {key!r} of {args.out}: measured on other weights than today's bundled model", flush=True)
    report.update({"date": _dt.date.today().isoformat(), "machine": f"{platform.machine()}",
                   "threads": args.threads, "torch": torch.__version__, "diffsampler": diffsampler.__version__})
    log = lambda msg: print(msg, flush=True)
    if args.analytic:
        report["analytic"] = analytic_section("gmm:digits", args.seeds, log)

    def save():
        write_atomic(args.out, json.dumps(report, indent=1).encode())
        write_atomic(args.out.with_suffix(".md"), markdown(report).encode())

    if args.bundled:
        if report.get("images") != args.images:
            report["bundled"] = {}
        report["images"] = args.images
        report.setdefault("bundled", {})
        bundled_section(args.images, log, report["bundled"], save, gits_too=not args.no_gits,
                        nfes=[int(n) for n in args.nfes.split(",")])
    if args.fid_check is not None:
        check = report.setdefault("fid_check", {}).get(str(args.fid_check))
        if check is None or check["images"] != args.check_images:
            check = report["fid_check"][str(args.fid_check)] = {"images": args.check_images, "rows": {}}
        for _ in fid_check_section(args.fid_check, args.check_images, log, check["rows"]):
            save()
    save()
    print(markdown(report))


if __name__ == "__main__":
    main()
