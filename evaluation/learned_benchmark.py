"""Learned samplers against the best untrained sampler a user can reach, on held-out seeds.

    python -m evaluation.learned_benchmark                       # every model (hours on 2 CPU cores; resumable)
    python -m evaluation.learned_benchmark --models gmm:digits --nfes 3-6 --out /tmp/lb   # one model
    python -m evaluation.learned_benchmark --report              # tables from what is recorded

For every benchmark model:

1. **Untrained sweep.**  Every registered solver (and the variants users meet elsewhere:
   ``ipndm_v legacy``, ``dpmpp legacy_third_order``) x {polynomial rho=7, logsnr, time_uniform
   rho=2} x {AFS off, on} at NFE 3-10: endpoint RMSE on the test seeds (0..N-1) against the exact
   ODE endpoint (analytic models: adaptive 8th-order solve) or against converged samples (the
   bundled network: Heun NFE 160, a random class per seed).  The best configuration per NFE is the
   baseline.
2. **Learned samplers** at NFE 3-6, each trained on the model by ``diffsampler.learn`` from seeds
   1,000,000 on (validation 2,000,000 on) and scored on the same test seeds, never seen in training:
   every method at its default settings on its default base, and on the baseline's own solver,
   schedule and AFS where the method accepts that solver.  Training time is recorded.
3. **FID** (``--fid``, bundled model): paired FID of the best learned and the best untrained
   configuration (by RMSE) at NFE 3-5 on 2000 images (seeds 0-1999, bundled classifier), with a
   paired bootstrap of the difference.

Results (raw, per model) are cached under evaluation/.cache/learned/ as they are made, so an
interrupted run resumes; ``results/learned.json`` and ``results/learned.md`` are written from them.
Every model's whole sweep (each configuration's RMSE, with the weights it was measured on) is also
written to ``results/sweeps.json``, the committed record that ``evaluation.defaults`` scores;
``--sweep-only`` runs and records the sweeps alone (no training, learned.json left as it is).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from diffsampler import learn, sample
from diffsampler.fileio import write_atomic
from diffsampler.learned import LEARNED
from diffsampler.learned.select import OPTION_VARIANTS
from diffsampler.models.identity import weights_hash
from diffsampler.seeds import parse_ranges, seed_noise
from diffsampler.solvers import SOLVERS
from evaluation.common import (CACHE, RESULTS, converged, exact_endpoints, features, labels_cond, load_model, machine,
                               markdown_table, paired_fid_difference, rmse_per_seed, slug)

MODELS = ["gmm:synthetic:16:3x32x32:0", "gmm:synthetic:32:1x8x8:5", "gmm:digits", "gmm:digits:0.1",
          "gmm:fashion-mnist:0:10000", "gmm:fashion-mnist:0.1:10000", "fashion-mnist"]
SEEDS = {"fashion-mnist": 64, "gmm:fashion-mnist:0:10000": 64, "gmm:fashion-mnist:0.1:10000": 64}
REFERENCE_KIND = {"converged": "converged samples (Heun NFE 160)", "exact": "exact ODE endpoints (tol 1e-9)"}
SWEEPS = "sweeps.json"
SCHEDULES = [("polynomial", {"rho": 7.0}), ("logsnr", {}), ("time_uniform", {"rho": 2.0})]
# Which bases each method accepts, besides its default (None: any registered solver).
ACCEPTS = {"ld3": None, "pas": None, "s4s": ("euler", "ipndm", "ipndm_v", "deis", "dpmpp", "unipc"),
           "epd": ("ipndm", "ipndm_v", "deis", "dpmpp", "euler"), "amed": ("euler", "ipndm", "dpmpp", "dpm2")}
# Default base per method: its default solver; AMED's odd NFE by a plain first step (AFS is poor where
# the data mean is far from 0: the bundled model), EPD-Solver with one point at even NFE.
CACHE_DIR = CACHE / "learned"


def configurations():
    """(label, solver, solver options, schedule, schedule options, afs) of the untrained sweep."""
    solvers = [(name, options) for name in SOLVERS if name != "amed" for options in OPTION_VARIANTS.get(name, ({},))]
    for name, options in solvers:
        for schedule, schedule_options in SCHEDULES:
            for afs in (False, True):
                tag = "".join(f" {k}={v}" for k, v in options.items())
                label = f"{name}{tag} | {schedule}{''.join(f' {k}={v:g}' for k, v in schedule_options.items())}" \
                        f"{' | AFS' if afs else ''}"
                yield label, name, options, schedule, schedule_options, afs


def cache_path(spec: str, cache_dir: Path = CACHE_DIR, seeds: Optional[int] = None) -> Path:
    """Where one model's raw results (sweep and learned runs) on ``seeds`` test seeds (default the
    benchmark's, ``SEEDS``) are cached."""
    return cache_dir / f"{slug(spec)}_seeds{SEEDS.get(spec, 128) if seeds is None else seeds}.json"


class Bench:
    """One benchmark model: its test seeds, reference, conditioning and cached results."""

    def __init__(self, spec: str, seeds: int, log, cache_dir: Path = CACHE_DIR):
        self.spec, self.log = spec, log
        self.model = load_model(spec)
        self.dtype = torch.float32 if spec == "fashion-mnist" else torch.float64
        self.cond_fn = labels_cond(self.model)
        self.seeds = list(range(seeds))
        self.noise = seed_noise(self.seeds, self.model.shape, dtype=self.dtype)
        self.cond = self.cond_fn(self.seeds) if self.cond_fn else None
        t0 = time.perf_counter()
        if spec == "fashion-mnist":
            self.reference = converged(self.model, seeds, "heun", 160).to(torch.float64)
            self.reference_kind = REFERENCE_KIND["converged"]
        else:
            self.reference, _ = exact_endpoints(self.model, spec, 0, seeds)
            self.reference_kind = REFERENCE_KIND["exact"]
        log(f"[{spec}] reference for {seeds} seeds: {time.perf_counter() - t0:.0f} s")
        self.path = cache_path(spec, cache_dir, seeds)
        self.results = json.loads(self.path.read_text()) if self.path.is_file() else {"sweep": {}, "learned": {}}
        weights = weights_hash(self.model)
        if self.results.setdefault("weights", weights) != weights:
            raise SystemExit(f"{self.path} holds runs of {spec} with other weights ({self.results['weights']}, today "
                             f"{weights}): move it away or give --cache-dir, so old and new runs are not mixed")

    def save(self):
        write_atomic(self.path, json.dumps(self.results, indent=1).encode())

    def rmse(self, **request) -> float:
        out = sample(self.model, self.noise, cond=self.cond, **request)
        self.rounds = out.rounds
        return float(rmse_per_seed(out.samples, self.reference).mean()), out.nfe

    def sweep(self, nfes):
        done = self.results["sweep"]
        for label, name, options, schedule, schedule_options, afs in configurations():
            for nfe in nfes:
                key = f"{label} @ {nfe}"
                if key in done:
                    continue
                try:
                    value, used = self.rmse(solver=name, nfe=nfe, schedule=schedule, schedule_options=schedule_options,
                                            afs=afs, **options)
                except ValueError:           # this NFE is not reachable with this solver and AFS setting
                    done[key] = None
                    continue
                done[key] = value if used == nfe and value == value else None
            self.save()
        self.log(f"[{self.spec}] sweep: {sum(v is not None for v in done.values())} configurations")

    def baseline(self, nfe):
        rows = [(v, k.rsplit(" @ ", 1)[0]) for k, v in self.results["sweep"].items()
                if v is not None and int(k.rsplit(" @ ", 1)[1]) == nfe]
        value, label = min(rows)
        return value, label, next(c for c in configurations() if c[0] == label)

    def learned_runs(self, nfe, methods=None):
        """(key, method, learn() keyword arguments) for this NFE (every method, or ``methods``)."""
        _, label, (_, name, options, schedule, schedule_options, afs) = self.baseline(nfe)
        runs = []
        for method, cls in LEARNED.items():
            if methods is not None and method not in methods:
                continue
            default = dict(solver=cls.default_solver)
            if method == "amed" and nfe % 2:
                default.update(plain_first=True)
            runs.append((f"{method} | default ({cls.default_solver} base)", method, default))
            accepts = ACCEPTS[method]
            if accepts is not None and name not in accepts:
                continue
            kw = dict(solver=name, schedule=schedule, schedule_options=schedule_options or None, afs=afs, **options)
            if method == "amed":             # two evaluations per step: odd NFE by AFS or a plain first step
                kw = dict(solver=name, schedule=schedule, schedule_options=schedule_options or None, afs=False)
                if nfe % 2:
                    kw.update(afs=True) if afs else kw.update(plain_first=True)
            runs.append((f"{method} | on the baseline ({label})", method, kw))
        return runs

    def train(self, nfe, methods=None):
        done = self.results["learned"]
        for key, method, kw in self.learned_runs(nfe, methods):
            key = f"{key} @ {nfe}"
            if key in done and done[key].get("training") == training_defaults(method):
                continue
            default = done.get(f"{method} | default ({LEARNED[method].default_solver} base) @ {nfe}", {})
            if "on the baseline" in key and _same_request(default.get("options"), kw) \
                    and default.get("training") == training_defaults(method):
                done[key] = {**default, "same_as": "the default run (auto chose the baseline's base)"}
                self.save()
                continue
            t0 = time.perf_counter()
            try:
                sampler = learn(method, self.model, nfe=nfe, cond=self.cond_fn, dtype=self.dtype, **kw)
            except ValueError as err:
                done[key] = {"error": str(err), "training": training_defaults(method)}
                self.log(f"[{self.spec}] {key}: {err}")
                self.save()
                continue
            seconds = time.perf_counter() - t0
            value, used = self.rmse(learned=sampler)
            rounds = self.rounds
            base = {**kw, **sampler.settings.get("base_choice", {}).get("chosen", {})}
            neutral = self.rmse(learned=LEARNED[method].create(self.model, self.model.shape, nfe=nfe, cond=self.cond_fn,
                                                               dtype=self.dtype, **base))[0]
            done[key] = {"rmse": value, "neutral_rmse": neutral, "nfe": used, "rounds": rounds, "train_s": seconds,
                         "best_iteration": sampler.settings["best_iteration"], "options": base,
                         "training": training_defaults(method)}
            self.log(f"[{self.spec}] {key}: {value:.4f} (neutral {neutral:.4f}, baseline {self.baseline(nfe)[0]:.4f}), "
                     f"{seconds:.0f} s")
            self.save()


def training_defaults(method: str) -> dict:
    """The method's training defaults today: a cached run made with other ones is redone."""
    cls = LEARNED[method]
    defaults = {"iters": cls.default_iters, "train_images": cls.default_train_images, "lr": cls.default_lr,
                "min_teacher_steps": cls.min_teacher_steps, "val_images": cls.default_val_images}
    if cls.default_confirm_images:           # recorded only when on, so the runs made before it existed stay valid
        defaults["confirm_images"] = cls.default_confirm_images
    return defaults


def _same_request(a, b) -> bool:
    norm = lambda r: json.dumps({k: v for k, v in (r or {}).items() if v not in (None, {}, False)}, sort_keys=True)
    return a is not None and norm(a) == norm(b)


def fid_section(bench: Bench, nfes, images: int, log) -> Dict[str, dict]:
    """Paired FID (bundled classifier) of the best learned vs the best untrained configuration."""
    out = {}
    for nfe in nfes:
        _, label, (_, name, options, schedule, schedule_options, afs) = bench.baseline(nfe)
        learned = {k: v for k, v in bench.results["learned"].items() if k.endswith(f"@ {nfe}") and "rmse" in v}
        key, best = min(learned.items(), key=lambda kv: kv[1]["rmse"])
        method = key.split(" | ")[0]
        sampler = learn(method, bench.model, nfe=nfe, cond=bench.cond_fn, **best["options"])
        ours = features(bench.model, images, learned=sampler)[0]
        theirs = features(bench.model, images, solver=name, nfe=nfe, schedule=schedule,
                          schedule_options=schedule_options, afs=afs, **options)[0]
        from evaluation.common import fid_of
        out[str(nfe)] = {"learned": key, "baseline": label, "fid_learned": fid_of(ours), "fid_baseline": fid_of(theirs),
                         "difference": paired_fid_difference(ours, theirs)}
        log(f"[fid] NFE {nfe}: {key} {out[str(nfe)]['fid_learned']:.3f} vs {label} {out[str(nfe)]['fid_baseline']:.3f}")
    return out


def report(models: List[str], nfes, sweep_nfes, cache_dir: Path = CACHE_DIR) -> dict:
    """The recorded results of every model (from the cache) with the summary tables' numbers."""
    rep = {"models": {}}
    for spec in models:
        path = cache_path(spec, cache_dir)
        if not path.is_file():
            continue
        res = json.loads(path.read_text())
        per_nfe = {}
        for nfe in sweep_nfes:
            rows = [(v, k.rsplit(" @ ", 1)[0]) for k, v in res["sweep"].items()
                    if v is not None and int(k.rsplit(" @ ", 1)[1]) == nfe]
            if not rows:
                continue
            base_value, base_label = min(rows)
            entry = {"baseline": base_label, "baseline_rmse": base_value}
            learned = {k.rsplit(" @ ", 1)[0]: v for k, v in res["learned"].items()
                       if int(k.rsplit(" @ ", 1)[1]) == nfe and "rmse" in v}
            if learned and nfe in nfes:
                best_key = min(learned, key=lambda k: learned[k]["rmse"])
                entry.update({"best_learned": best_key, "best_learned_rmse": learned[best_key]["rmse"],
                              "ratio": learned[best_key]["rmse"] / base_value, "learned": learned})
            per_nfe[str(nfe)] = entry
        rep["models"][spec] = {"seeds": SEEDS.get(spec, 128), "weights": res.get("weights"), "per_nfe": per_nfe,
                               "fid": res.get("fid")}
    return rep


def record_sweeps(path: Path, models: List[str], cache_dir: Path = CACHE_DIR) -> dict:
    """Merge the cached sweeps of ``models`` into the committed record at ``path``.

    One entry per model: its seeds, weights hash, reference and {"label @ nfe": rmse}.  A model's
    entry is replaced whole, so a record never mixes runs made on different weights."""
    record = json.loads(path.read_text()) if path.is_file() else {}
    for spec in models:
        cached = cache_path(spec, cache_dir)
        if not cached.is_file():
            continue
        res = json.loads(cached.read_text())
        record[spec] = {"seeds": SEEDS.get(spec, 128), "weights": res.get("weights"),
                        "reference": REFERENCE_KIND["converged" if spec == "fashion-mnist" else "exact"],
                        "recorded": machine(), "sweep": res["sweep"]}
    write_atomic(path, json.dumps(dict(sorted(record.items())), indent=1).encode() + b"\n")
    return record


def markdown(rep: dict) -> str:
    lines = ["# Learned samplers vs the best untrained configuration", "",
             f"Recorded {rep.get('machine', {}).get('date', '?')} ({rep.get('machine', {}).get('cpu', '?')}). "
             "Endpoint RMSE on held-out test seeds (0..N-1; training used seeds from 1,000,000, validation from "
             "2,000,000); analytic models against exact ODE endpoints, the bundled network against converged "
             "samples (Heun NFE 160). The baseline is the best of every solver x {polynomial, logsnr, time_uniform "
             "rho=2} x {AFS off, on}. Goal: best learned <= 0.5 x baseline.", ""]
    rows = []
    for spec, info in rep["models"].items():
        for nfe, e in info["per_nfe"].items():
            if "best_learned" in e:
                rows.append([spec, nfe, f"{e['baseline_rmse']:.4f}", e["baseline"], f"{e['best_learned_rmse']:.4f}",
                             e["best_learned"], f"{e['ratio']:.2f}", "yes" if e["ratio"] <= 0.5 else "no"])
    lines += [markdown_table(["model", "NFE", "best untrained", "configuration", "best learned", "sampler",
                              "ratio", "<= 0.5"], rows), ""]
    lines += ["## Each method against its own base (default settings)", ""]
    rows = []
    for spec, info in rep["models"].items():
        for nfe, e in info["per_nfe"].items():
            for key, v in sorted(e.get("learned", {}).items()):
                rows.append([spec, nfe, key, v.get("rounds", "") if v.get("rounds") != v.get("nfe") else "",
                             f"{v['neutral_rmse']:.4f}", f"{v['rmse']:.4f}", f"{v['rmse'] / v['neutral_rmse']:.2f}",
                             f"{v['train_s']:.0f}"])
    lines += ["NFE counts every model evaluation; the rounds column (EPD only) counts the sequential batched calls, "
              "which is what the EPD paper reports as NFE.", "",
              markdown_table(["model", "NFE", "method / base", "rounds (paper's NFE)", "base (neutral)", "learned",
                              "ratio", "train s"], rows)]
    fid_rows = [[spec, nfe, f["learned"], f"{f['fid_learned']:.3f}", f["baseline"], f"{f['fid_baseline']:.3f}",
                 f"{f['difference']['mean']:+.3f} +- {f['difference']['std']:.3f}"]
                for spec, info in rep["models"].items() for nfe, f in (info.get("fid") or {}).items()]
    if fid_rows:
        lines += ["", "## Paired FID on the bundled model (2000 images, bundled classifier)", "",
                  markdown_table(["model", "NFE", "learned", "FID", "untrained", "FID", "difference"], fid_rows)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--nfes", default="3-6", help="NFEs of the learned samplers")
    parser.add_argument("--sweep-nfes", default="3-10", help="NFEs of the untrained sweep")
    parser.add_argument("--fid", action="store_true", help="paired FID on the bundled model (2000 images)")
    parser.add_argument("--fid-images", type=int, default=2000)
    parser.add_argument("--report", action="store_true", help="only write the tables from the cache")
    parser.add_argument("--methods", default=",".join(LEARNED),
                        help="learned samplers to train (default: every one); the tables show those measured")
    parser.add_argument("--sweep-only", action="store_true",
                        help="only the untrained sweeps: record them in OUT/sweeps.json, train nothing")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR,
                        help="where runs are cached (a second process side by side needs its own; merge by hand)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = args.models.split(",")
    nfes, sweep_nfes = parse_ranges(args.nfes, "NFEs"), parse_ranges(args.sweep_nfes, "NFEs")
    t0 = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t0:7.0f}s] {msg}", flush=True)
    if not args.report:
        for spec in models:
            bench = Bench(spec, SEEDS.get(spec, 128), log, args.cache_dir)
            bench.sweep(sorted(set(sweep_nfes) | (set() if args.sweep_only else set(nfes))))
            if args.sweep_only:
                continue
            for nfe in nfes:
                bench.train(nfe, methods=args.methods.split(","))
            if args.fid and spec == "fashion-mnist" and "fid" not in bench.results:
                bench.results["fid"] = fid_section(bench, [n for n in nfes if n <= 5], args.fid_images, log)
                bench.save()
    args.out.mkdir(parents=True, exist_ok=True)
    record_sweeps(args.out / SWEEPS, models, args.cache_dir)
    log(f"recorded the sweeps in {args.out / SWEEPS}")
    if args.sweep_only:
        return 0
    rep = report(models, nfes, sweep_nfes, args.cache_dir)
    rep["machine"] = machine()
    write_atomic(args.out / "learned.json", json.dumps(rep, indent=1).encode() + b"\n")
    write_atomic(args.out / "learned.md", markdown(rep).encode())
    log(f"wrote {args.out / 'learned.json'} and learned.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
