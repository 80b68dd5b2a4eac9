"""The plan/loop redesign (issue 13) changed no sample: every solver variant at NFE 4-7, AFS on
and off, gives the samples the pre-redesign code gave on the same model and noise (recorded by
tests/golden/record.py), to float64 rounding; AMED predictor files written then still load and
sample identically."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from diffsampler import sample

GOLDEN = Path(__file__).resolve().parent / "golden"
sys.path.insert(0, str(GOLDEN))
import record  # noqa: E402

RECORDED = dict(np.load(GOLDEN / "samples.npz"))


def test_every_solver_variant_was_recorded():
    solvers = {json.loads(k)["solver"] for k in RECORDED}
    from diffsampler.solvers import SOLVERS
    assert set(SOLVERS) - {"ld3", "s4s", "epd", "pas"} <= solvers | set()
    assert len(RECORDED) > 500


@pytest.fixture(scope="module")
def model_and_noise():
    return record.model_and_noise()


# The defaults the samples were recorded with (defaults may change by measurement; formulas may not).
RECORDED_SCHEDULES = {"deis": ("time_uniform", {"rho": 2.0}), "dpmpp": ("logsnr", {}), "unipc": ("logsnr", {})}
RECORDED_OPTIONS = {"ipndm_v": {"legacy": False}, "dpmpp": {"legacy_third_order": False}}


@pytest.mark.parametrize("key", sorted(RECORDED))
def test_samples_equal_the_recorded_ones(key, model_and_noise):
    model, noise = model_and_noise
    c = json.loads(key)
    schedule, schedule_options = RECORDED_SCHEDULES.get(c["solver"], ("polynomial", {"rho": 7.0}))
    options = {**RECORDED_OPTIONS.get(c["solver"], {}), **c["options"]}
    out = sample(model, noise, solver=c["solver"], nfe=c["nfe"], afs=c["afs"], denoise_to_zero=c["denoise_to_zero"],
                 schedule=schedule, schedule_options=schedule_options or None, **options)
    assert out.nfe == c["nfe"]
    np.testing.assert_allclose(out.samples.numpy(), RECORDED[key], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["amed_solver_afs5", "amed_ipndm_plain5", "amed_dpmpp4"])
def test_amed_predictor_files_of_the_old_version_sample_identically(name, model_and_noise):
    from diffsampler import amed
    model, noise = model_and_noise
    out = sample(model, noise, amed=amed.load(GOLDEN / f"{name}.pt"))
    # The predictor network runs in float32, whose kernels round differently on different CPUs (recorded
    # on an AMD EPYC; an Intel Xeon differs by 5e-8): 1e-6 allows that and stays far below any error of
    # the sampler itself.
    np.testing.assert_allclose(out.samples.numpy(), np.load(GOLDEN / "amed_samples.npz")[name], rtol=0, atol=1e-6)


def test_amed_predictor_on_the_bundled_network_samples_identically():
    from diffsampler import amed
    from diffsampler.generate import one_hot_labels, seed_labels
    from diffsampler.models.specs import load_model
    from diffsampler.seeds import seed_noise
    model = load_model("fashion-mnist-v1")      # the weights it was recorded on (the bundled model then)
    labels = {"class_labels": one_hot_labels(seed_labels([0, 1], 10), 10)}
    out = sample(model, seed_noise(range(2), model.shape), amed=amed.load(GOLDEN / "amed_bundled_ipndm4.pt"), cond=labels)
    np.testing.assert_allclose(out.samples.numpy(), np.load(GOLDEN / "amed_bundled_samples.npz")["samples"],
                               rtol=0, atol=1e-5)
