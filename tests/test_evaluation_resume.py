"""The benchmarks resume their recorded reports; rows measured on other bundled weights must not be
mixed into a rerun after the bundled model changed (evaluation.common.drop_stale_bundled)."""
import torch

from diffsampler.models.edm import EDMDenoiser
from diffsampler.models.identity import weights_hash
from diffsampler.models.unet import UNet, UNetConfig
from evaluation.common import drop_stale_bundled


def _tiny(seed):
    torch.manual_seed(seed)
    cfg = UNetConfig(image_size=8, base_channels=8, channel_mult=(1, 2), groups=4, attention_mid=False, num_classes=10)
    return EDMDenoiser(UNet(cfg), num_classes=10)


def test_rows_of_other_weights_are_dropped_and_rows_of_the_same_weights_kept():
    old, new = _tiny(0), _tiny(1)
    report = {"analytic": {"a": 1}, "bundled": {"x": 2}, "fid_nfe5": {"y": 3}, "fidelity": 4}
    assert drop_stale_bundled(report, ["bundled", "fid_*"], model=old) == ["bundled", "fid_nfe5"]
    assert report == {"analytic": {"a": 1}, "fidelity": 4, "bundled_weights": weights_hash(old)}
    report["bundled"] = {"x": 5}                        # measured on `old`, recorded as such
    assert drop_stale_bundled(report, ["bundled"], model=old) == [] and report["bundled"] == {"x": 5}
    assert drop_stale_bundled(report, ["bundled"], model=new) == ["bundled"]
    assert report["bundled_weights"] == weights_hash(new) != weights_hash(old)
