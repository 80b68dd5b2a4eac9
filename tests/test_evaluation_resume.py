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


def test_recorded_sweeps_replace_a_models_entry_whole_and_feed_the_defaults_score(tmp_path):
    """results/sweeps.json keeps each model's whole sweep with its weights; a rerun of one model on
    new weights replaces that model's entry (no old rows survive) and leaves the others; the
    defaults score reads the record and ranks the configurations by exact ratios."""
    import json
    from evaluation.defaults import load_sweeps, score
    from evaluation.learned_benchmark import record_sweeps

    cache = tmp_path / "cache"
    cache.mkdir()
    write = lambda name, weights, sweep: (cache / name).write_text(json.dumps({"weights": weights, "sweep": sweep}))
    write("gmm-digits_seeds128.json", "w-digits", {"euler | logsnr @ 3": 2.0, "unipc | logsnr @ 3": 1.0})
    write("fashion-mnist_seeds64.json", "w-old", {"euler | logsnr @ 3": 4.0, "ipndm | logsnr @ 3": 8.0})
    record = tmp_path / "sweeps.json"
    record_sweeps(record, ["gmm:digits", "fashion-mnist"], cache)
    write("fashion-mnist_seeds64.json", "w-new", {"euler | logsnr @ 3": 3.0, "unipc | logsnr @ 3": 6.0})
    entries = record_sweeps(record, ["fashion-mnist"], cache)
    assert entries["fashion-mnist"]["weights"] == "w-new" and entries["gmm:digits"]["weights"] == "w-digits"
    assert "ipndm | logsnr @ 3" not in entries["fashion-mnist"]["sweep"]
    assert json.loads(record.read_text()) == entries
    table = load_sweeps(sweeps={spec: e["sweep"] for spec, e in entries.items()})
    assert table[("fashion-mnist", 3)] == {"euler | logsnr": 3.0, "unipc | logsnr": 6.0}
    unipc, cells = score(table, lambda label: label.startswith("unipc"))
    assert cells == 2 and abs(unipc - (1.0 * 2.0) ** 0.5) < 1e-12      # ratios 1 (digits) and 2 (fashion-mnist)


def test_the_sfd_report_compares_only_learned_rows_of_the_students_teacher_from_the_newest_report(tmp_path, monkeypatch):
    import json
    import evaluation.sfd_benchmark as sfd

    monkeypatch.setattr(sfd, "RESULTS", tmp_path)
    (tmp_path / "amed.json").write_text(json.dumps(
        {"images": 500, "bundled_weights": "old", "bundled": {"amed-ipndm": {"4": {"rmse": 0.1, "fid": 3.0}}}}))
    (tmp_path / "retrained").mkdir()
    learned = lambda weights, rmse: json.dumps({"models": {"fashion-mnist": {
        "seeds": 64, "weights": weights, "fid": {}, "per_nfe": {"4": {"learned": {"s4s | default": {"rmse": rmse}}}}}}})
    (tmp_path / "learned.json").write_text(learned("old", 0.2))
    (tmp_path / "retrained" / "learned.json").write_text(learned("new", 0.05))
    rows = sfd.learned_rows({3, 4}, "new")
    assert [(r["method"], r["rmse"]) for r in rows] == [("s4s | default", 0.05)]
    assert {r["method"] for r in sfd.learned_rows({4}, "old")} == {"amed-ipndm", "s4s | default"}
    assert sfd.learned_rows({4}, "other") == []
    (tmp_path / "finetuned").mkdir()                  # an older report on the same weights: not mixed in
    (tmp_path / "finetuned" / "learned.json").write_text(learned("new", 0.01))
    assert [(r["method"], r["rmse"]) for r in sfd.learned_rows({4}, "new")] == [("s4s | default", 0.05)]


def test_defaults_read_several_sweep_records_the_later_one_winning_per_model(tmp_path):
    """`evaluation.defaults --sweeps A B`: a model rerun on new weights into its own folder (B)
    replaces that model's whole entry from the main record (A); the other models stay."""
    import json
    from evaluation.defaults import recorded_entries

    main, rerun = tmp_path / "sweeps.json", tmp_path / "rerun.json"
    main.write_text(json.dumps({"gmm:digits": {"weights": "w-d", "sweep": {"euler | logsnr @ 3": 2.0}},
                                "fashion-mnist": {"weights": "w-old", "sweep": {"ipndm | logsnr @ 3": 8.0}}}))
    rerun.write_text(json.dumps({"fashion-mnist": {"weights": "w-new", "sweep": {"unipc | logsnr @ 3": 6.0}}}))
    entries = recorded_entries([main, rerun])
    assert {m: e["weights"] for m, e in entries.items()} == {"gmm:digits": "w-d", "fashion-mnist": "w-new"}
    assert entries["fashion-mnist"]["sweep"] == {"unipc | logsnr @ 3": 6.0}
    assert recorded_entries([rerun, main])["fashion-mnist"]["weights"] == "w-old"


def test_gits_merge_takes_side_by_side_sections_only_from_the_same_bundled_weights():
    """`gits_benchmark --merge`: a run made with its own --out on today's weights brings its FID rows
    (accumulated with the recorded ones), its converged and search-cost sections (replacing); a
    report measured on other weights brings none of its bundled sections, only endpoint sections."""
    from evaluation.gits_benchmark import merge_report

    fid = lambda first, rows: {"images": 2000, "first_seed": first, "settings": [["dev", 1.05]], "rows": rows}
    report = {"bundled_weights": "w", "fid": fid(0, {"ipndm": {"4": {"default": {"fid": 4.0}}}}),
              "converged": {"seeds": 200, "old": True}}
    same = {"bundled_weights": "w", "fid": fid(0, {"ipndm": {"5": {"default": {"fid": 3.0}}}}),
            "fid_held_out": fid(2000, {"ipndm": {"4": {"default": {"fid": 4.5}}}}),
            "converged": {"seeds": 200, "new": True}, "search_cost": {"runs": [1]}}
    messages = []
    merge_report(report, same, messages.append)
    assert set(report["fid"]["rows"]["ipndm"]) == {"4", "5"} and messages == []
    assert report["fid_2000_from_seed_2000"]["first_seed"] == 2000
    assert report["converged"] == {"seeds": 200, "new": True} and report["search_cost"] == {"runs": [1]}
    other = {"bundled_weights": "v", "converged": {"stale": True}, "fid": fid(0, {"euler": {}}),
             "endpoint_error": {"gmm:digits": {"x": 1}}}
    merge_report(report, other, messages.append, name="old.json")
    assert report["converged"] == {"seeds": 200, "new": True} and "euler" not in report["fid"]["rows"]
    assert report["endpoint_error"] == {"gmm:digits": {"x": 1}}
    assert len(messages) == 1 and "old.json" in messages[0] and "other weights" in messages[0]


def test_the_sfd_reports_teacher_rows_rebuild_the_committed_students_teacher_solve():
    """The teacher row of each student NFE is the recorded teacher on the polynomial grid of
    (M + 1) x the student's steps, which passes through every student sigma; one evaluation per step."""
    import json
    from pathlib import Path
    from evaluation.sfd_benchmark import kwargs_of, teacher_configuration

    record = json.loads((Path(__file__).parents[1] / "checkpoints/fashion-mnist-sfd/config.json").read_text())["distilled"]
    rho, m = record["schedule_options"]["rho"], record["M"]
    for k in record["nfes"]:
        config = teacher_configuration(record, k)
        student_sigmas = record["sigmas"][str(k)]
        steps = (m + 1) * (len(student_sigmas) - 1)
        hi, lo = student_sigmas[0] ** (1 / rho), student_sigmas[-1] ** (1 / rho)
        polynomial = [(hi + (lo - hi) * i / steps) ** rho for i in range(steps + 1)]
        assert config["nfe"] == record["teacher_steps"][str(k)] == steps
        assert max(abs(a - b) / b for a, b in zip(config["sigmas"], polynomial)) < 1e-12
        assert config["sigmas"][:: m + 1] == student_sigmas
        kwargs = kwargs_of(config)
        assert kwargs.pop("solver") == record["teacher"]["name"] and kwargs.pop("afs") is False
        assert kwargs.pop("sigmas") == config["sigmas"]
        assert kwargs == {key: v for key, v in record["teacher"].items() if key != "name"}


def test_the_sfd_grid_studys_first_candidate_is_the_committed_students_teacher_and_each_grid_has_its_own_cache():
    """evaluation.sfd_grid rebuilds the student grid and teacher solve from a candidate; its first
    candidate must be the committed student's (same sigmas, teacher and M), and teacher solves on two
    grids at one NFE must be cached under different names (they overwrote each other once)."""
    import json
    from pathlib import Path
    from evaluation.sfd_benchmark import _slug, teacher_configuration
    from evaluation.sfd_grid import CANDIDATES, record_of

    committed = json.loads((Path(__file__).parents[1] / "checkpoints/fashion-mnist-sfd/config.json").read_text())["distilled"]
    model = _tiny(0)                    # the bundled model's sigma range (0.002..80), so its grids
    schedule, options, m, teacher = CANDIDATES[0]
    ours = record_of(model, schedule, options, m, teacher, committed["nfes"])
    assert (ours["schedule"], ours["schedule_options"], ours["M"]) == (committed["schedule"], committed["schedule_options"],
                                                                       committed["M"])
    assert ours["teacher"] == committed["teacher"]
    for k in committed["nfes"]:
        assert max(abs(a - b) / b for a, b in zip(ours["sigmas"][str(k)], committed["sigmas"][str(k)])) < 1e-12
        assert teacher_configuration(ours, k)["nfe"] == committed["teacher_steps"][str(k)]
    names = {_slug(teacher_configuration(record_of(model, s, o, m_, t, [2]), 2)) for s, o, m_, t in CANDIDATES}
    assert len(names) == len(CANDIDATES)
