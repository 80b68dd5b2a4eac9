"""Records the samples of every solver variant as the code stood before the plan/loop redesign
(issue 13), so tests/test_golden.py can check that the redesign changed no sample.

Run once, with the pre-redesign code: ``python tests/golden/record.py``.  It writes
``tests/golden/samples.npz`` (one array per configuration, keyed by its JSON) and the AMED
predictor files ``amed_*.pt`` with their samples.  Not rerun afterwards: the point is to keep
what the old code produced.
"""
import itertools
import json
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def variants():
    """(solver, options) for every solver and every option variant."""
    yield "euler", {}
    yield "heun", {}
    for r in (0.5, 0.3, 1.0):
        yield "dpm2", {"r": r}
    for name in ("ipndm", "ipndm_v", "deis"):
        for order in (1, 2, 3, 4):
            yield name, {"max_order": order}
    for order, kind, legacy, final in itertools.product((1, 2, 3), ("midpoint", "heun"), (False, True), (True, False)):
        yield "dpmpp", {"max_order": order, "solver_type": kind, "legacy_third_order": legacy, "lower_order_final": final}
    for order, variant, corrector, final in itertools.product((1, 2, 3), ("bh1", "bh2"), (True, False), (True, False)):
        yield "unipc", {"max_order": order, "variant": variant, "corrector": corrector, "lower_order_final": final}
    for base, r, plain in itertools.product((None, "euler", "ipndm", "dpmpp", "dpm2"), (0.5, 0.3), (False, True)):
        yield "amed", {"base": base, "r": r, "plain_first": plain}


def model_and_noise():
    from diffsampler.models.specs import load_model
    from diffsampler.seeds import seed_noise
    model = load_model("gmm:digits:0.3")
    return model, seed_noise(range(3), model.shape, dtype=torch.float64)


def key(solver, options, nfe, afs, denoise_to_zero):
    return json.dumps({"solver": solver, "options": options, "nfe": nfe, "afs": afs,
                       "denoise_to_zero": denoise_to_zero}, sort_keys=True)


def configurations():
    for solver, options in variants():
        for nfe, afs in itertools.product((4, 5, 6), (False, True)):
            yield solver, options, nfe, afs, False
        yield solver, options, 7, False, True


def main():
    from diffsampler import amed, sample
    from diffsampler.solvers import get_solver
    model, noise = model_and_noise()
    arrays = {}
    for solver, options, nfe, afs, dtz in configurations():
        obj = get_solver(solver, **options)
        steps_ok = nfe in obj.valid_nfes(afs, dtz, up_to=nfe + 2)
        if not steps_ok:
            continue
        out = sample(model, noise, solver=solver, nfe=nfe, afs=afs, denoise_to_zero=dtz, **options)
        assert out.nfe == nfe
        arrays[key(solver, options, nfe, afs, dtz)] = out.samples.numpy()
    np.savez_compressed(HERE / "samples.npz", **arrays)
    print(f"{len(arrays)} configurations")
    trained = {}
    for name, kwargs in {"amed_solver_afs5": dict(solver="amed", nfe=5),
                         "amed_ipndm_plain5": dict(solver="ipndm", nfe=5, plain_first=True, scale_dir=0.1),
                         "amed_dpmpp4": dict(solver="dpmpp", nfe=4, scale_time=0.05)}.items():
        predictor = amed.train(model, solver=kwargs.pop("solver"), **kwargs, iters=4, batch=8)
        predictor.save(HERE / f"{name}.pt")
        trained[name] = sample(model, noise, amed=amed.load(HERE / f"{name}.pt")).samples.numpy()
    np.savez_compressed(HERE / "amed_samples.npz", **trained)



def record_bundled():
    """An AMED plugin predictor on the first bundled network, ``fashion-mnist-v1`` (features hooked on
    its ``mid`` block)."""
    from diffsampler import amed, sample
    from diffsampler.generate import one_hot_labels, seed_labels
    from diffsampler.models.specs import load_model
    from diffsampler.seeds import seed_noise
    model = load_model("fashion-mnist-v1")
    cond = lambda seeds: {"class_labels": one_hot_labels(seed_labels(seeds, 10), 10)}
    predictor = amed.train(model, solver="ipndm", nfe=4, iters=2, batch=4, cond=cond, model_name="fashion-mnist")
    predictor.save(HERE / "amed_bundled_ipndm4.pt")
    noise = seed_noise(range(2), model.shape)
    out = sample(model, noise, amed=amed.load(HERE / "amed_bundled_ipndm4.pt"), cond=cond([0, 1]))
    np.savez_compressed(HERE / "amed_bundled_samples.npz", samples=out.samples.numpy())


if __name__ == "__main__":
    main()
    record_bundled()
