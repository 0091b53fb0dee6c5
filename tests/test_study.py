import csv
import dataclasses
import json
import math
import statistics
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

import study
import train as cli
import vqvae
import conftest
from conftest import interrupt_on_call, tiny_config

ROOT = Path(__file__).resolve().parents[1]
TINY = conftest.TINY | dict(synthetic_size=128, epochs=2)  # the suite's tiny config, a shorter dataset


def write_sweep(tmp_path, runs=None, **top):
    """A two-run sweep on the tiny config; returns its path."""
    data = {"study": "mini", "base": dict(TINY),
            "runs": runs or [{"name": "vq", "quantizer": "vq_ema"},
                             {"name": "ba", "quantizer": "ba_vq", "ba_iters": 2, "entropy_weight": 0.1}]}
    data.update(top)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def sweep(tmp_path, path=None, seeds=1, **flags):
    return study.run_sweep(path or write_sweep(tmp_path), flags={"out_dir": str(tmp_path / "exp"), **flags},
                           seeds=seeds)


def final(run_dir):
    return json.loads((run_dir / "final_metrics.json").read_text())


def test_sweep_runs_each_run_in_its_directory_and_summarizes(tmp_path):
    rows = sweep(tmp_path)
    study_dir = tmp_path / "exp" / "mini"
    assert [r["run"] for r in rows] == ["vq", "ba"]
    for row in rows:
        metrics = final(study_dir / row["run"])
        assert row["psnr"] == metrics["psnr"] and row["perplexity"] == metrics["perplexity"] and row["seeds"] == 1
    assert vqvae.read_yaml(study_dir / "ba" / "config.yaml")["ba_iters"] == 2
    assert vqvae.read_yaml(study_dir / "vq" / "config.yaml")["wandb_group"] == "mini"
    with open(study_dir / "experiment_results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["run"] for r in table] == ["vq", "ba"]
    assert float(table[1]["psnr_legacy"]) == pytest.approx(final(study_dir / "ba")["psnr_legacy"])
    md = (study_dir / "results.md").read_text()
    assert "| 2 | ba | quantizer=ba_vq ba_iters=2 entropy_weight=0.1 | 1 |" in md
    counts = study.read_code_counts(study_dir / "vq")
    assert counts.shape == (32,) and counts.sum() == TINY["synthetic_size"] // 4 * 64  # each validation latent once
    assert (counts > 0).sum() == 32 - final(study_dir / "vq")["dead_codes"]


def test_rerun_skips_finished_runs(tmp_path, monkeypatch):
    path = write_sweep(tmp_path)
    sweep(tmp_path, path)
    before = (tmp_path / "exp" / "mini" / "vq" / "final_metrics.json").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(vqvae, "train", no_training)
    sweep(tmp_path, path)
    assert (tmp_path / "exp" / "mini" / "vq" / "final_metrics.json").read_text() == before


def test_interrupted_study_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    path = write_sweep(tmp_path)
    reference = sweep(tmp_path, path, out_dir=str(tmp_path / "whole"))
    restore = interrupt_on_call(monkeypatch, "evaluate", 5)  # second run, end of epoch 2, after epoch 1's checkpoint (a run: 2 validations, 1 pass over the training codes)
    with pytest.raises(KeyboardInterrupt):
        sweep(tmp_path, path)
    restore()
    assert study.run_state(tmp_path / "exp" / "mini" / "ba") == "interrupted"
    resumed = sweep(tmp_path, path)
    keys = ("psnr", "psnr_legacy", "perplexity", "usage_rate", "dead_codes", "beta")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in reference]


def test_seeds_repeat_each_run_and_the_summary_is_mean_and_std(tmp_path):
    rows = sweep(tmp_path, seeds=2)
    study_dir = tmp_path / "exp" / "mini"
    for row in rows:
        runs = [final(study_dir / row["run"]), final(study_dir / f"{row['run']}_seed1338")]
        assert row["seeds"] == 2
        assert row["psnr"] == pytest.approx(statistics.mean(r["psnr"] for r in runs))
        assert row["psnr_std"] == pytest.approx(statistics.stdev(r["psnr"] for r in runs))
    assert vqvae.read_yaml(study_dir / "vq_seed1338" / "config.yaml")["seed"] == 1338
    assert "±" in (study_dir / "results.md").read_text()


def test_flags_beside_sweep_override_every_run(tmp_path):
    code = cli.main(["--sweep", str(write_sweep(tmp_path)), "--max_steps", "3", "--out_dir", str(tmp_path / "exp")])
    assert code == 0
    for run in ("vq", "ba"):
        assert final(tmp_path / "exp" / "mini" / run)["steps"] == 3
    assert cli.main(["--summarize", str(tmp_path / "exp" / "mini")]) == 0


def test_unfinished_runs_are_listed_without_metrics(tmp_path):
    sweep(tmp_path, max_steps=2)
    (tmp_path / "exp" / "mini" / "ba" / "final_metrics.json").unlink()
    rows = study.summarize(tmp_path / "exp" / "mini")
    assert rows[1]["seeds"] == 0 and rows[1]["psnr"] != rows[1]["psnr"]  # nan
    assert "| 2 | ba |" in (tmp_path / "exp" / "mini" / "results.md").read_text()


@pytest.mark.parametrize("change,match", [
    (dict(runs=[{"name": "vq", "quantizer": "vq_ema", "entropy_wieght": 0.1}]), "did you mean 'entropy_weight'"),
    (dict(runs=[{"name": "vq"}, {"name": "vq"}]), "two runs are named 'vq'"),
    (dict(runs=[{"quantizer": "vq_ema"}]), "run 1 needs a 'name'"),
    (dict(runs=[{"name": "vq", "out_dir": "x"}]), "may not set name or out_dir"),
    (dict(runz=[]), "unknown key 'runz'.*did you mean 'runs'"),
    (dict(study="a b"), "'study' must be a name"),
    (dict(runs=[{"name": "vq", "quantizer": "vq_emma"}]), "did you mean 'vq_ema'"),
])
def test_bad_sweep_files_are_refused_before_any_work(tmp_path, change, match):
    with pytest.raises(vqvae.VQVAEError, match=match):
        sweep(tmp_path, write_sweep(tmp_path, **change))
    assert not (tmp_path / "exp").exists()


def test_a_finished_run_with_other_settings_is_not_silently_reused(tmp_path):
    path = write_sweep(tmp_path)
    sweep(tmp_path, path, max_steps=2)
    with pytest.raises(vqvae.VQVAEError, match="max_steps: 2 there, 3 now"):
        sweep(tmp_path, path, max_steps=3)
    assert final(tmp_path / "exp" / "mini" / "vq")["steps"] == 2
    study.run_sweep(path, flags={"out_dir": str(tmp_path / "exp"), "max_steps": 3}, overwrite=True)
    assert final(tmp_path / "exp" / "mini" / "vq")["steps"] == 3


def test_cli_refuses_flags_that_do_not_fit_a_sweep(tmp_path, capsys):
    path = str(write_sweep(tmp_path))
    assert cli.main(["--sweep", path, "--name", "x"]) == 2
    assert "--name cannot be given with --sweep" in capsys.readouterr().err
    assert cli.main(["--sweep", path, "--seeds", "0"]) == 2
    assert cli.main(["--seeds", "2", "--dataset", "synthetic"]) == 2
    assert cli.main(["--summarize", str(tmp_path / "nothing")]) == 2
    assert "no study directory" in capsys.readouterr().err


def test_shipped_ba_wins_shares_the_ba_study_recipe():
    """sweeps/ba_wins.yaml: every run is a valid config; its VQ-EMA baselines are ba_study's own
    (same resolved config but the study's name and directory), so the two studies' baselines are the same runs, and
    every BA candidate has the same recipe with dimensionless β."""
    _, wins = study.plan_sweep(ROOT / "sweeps" / "ba_wins.yaml")
    _, ours = study.plan_sweep(ROOT / "sweeps" / "ba_study.yaml")
    by_name = {p.run: dataclasses.replace(p.cfg, wandb_group="", out_dir="") for p in ours}
    for name in ("baseline", "baseline_dead_reset"):
        win = next(p.cfg for p in wins if p.run == name)
        assert dataclasses.replace(win, wandb_group="", out_dir="") == by_name[name]
    recipe = ("arch", "codebook_size", "latent_dim", "batch_size", "epochs", "lr", "weight_decay", "seed",
              "codebook_init", "commitment_weight")
    for p in wins:
        large = p.run.endswith("_k16384")  # the same recipe at K = 16,384
        assert p.cfg.codebook_size == (16384 if large else 512)
        assert [getattr(p.cfg, k) for k in recipe if k != "codebook_size"] == [
            getattr(by_name["baseline"], k) for k in recipe if k != "codebook_size"]
        if p.cfg.quantizer == "ba_vq":
            assert p.cfg.beta_units in ("relative", "critical")
    # each K = 16,384 run is its K = 512 namesake with K and the dead-code threshold scaled by 32
    named = {p.run: p.cfg for p in wins}
    for run, cfg in named.items():
        if run.endswith("_k16384"):
            small = named[run[:-len("_k16384")]]
            assert cfg.dead_code_threshold == pytest.approx(small.dead_code_threshold / 32, rel=0.05)
            assert dataclasses.replace(cfg, codebook_size=512, dead_code_threshold=small.dead_code_threshold,
                                       name=small.name) == small


def test_shipped_ba_collapse_is_the_published_ba_iters5_with_one_change_at_a_time():
    """sweeps/ba_collapse.yaml: its control run is the published recipe's ba_iters5 (β held at
    β_start, 600 steps); every other run differs from the control only in the keys it names."""
    _, collapse = study.plan_sweep(ROOT / "sweeps" / "ba_collapse.yaml")
    _, published = study.plan_sweep(ROOT / "sweeps" / "ba_study_published.yaml")
    ignore = dict(wandb_group="", out_dir="", name="")
    ba_iters5 = next(p.cfg for p in published if p.run == "ba_iters5")
    control = next(p.cfg for p in collapse if p.run == "published")
    assert dataclasses.replace(control, **ignore) == dataclasses.replace(
        ba_iters5, beta_end=ba_iters5.beta_start, max_steps=600, epochs=2, **ignore)
    runs = vqvae.read_yaml(ROOT / "sweeps" / "ba_collapse.yaml")["runs"]
    for run, p in zip(runs, collapse):
        named = {k: v for k, v in run.items() if k != "name"}
        differ = {f.name for f in dataclasses.fields(vqvae.Config)
                  if getattr(p.cfg, f.name) != getattr(control, f.name)} - set(ignore)
        assert differ == {k for k, v in named.items() if getattr(control, k) != v}, p.run


def test_wandb_runs_of_a_study_share_its_group(tmp_path, monkeypatch):
    inits = []

    class FakeRun:
        def log(self, *args, **kwargs):
            pass

        def finish(self):
            pass

    fake = types.SimpleNamespace(init=lambda **kw: inits.append(kw) or FakeRun(), Settings=lambda **kw: None)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "offline")
    sweep(tmp_path, wandb=True, max_steps=1)
    assert [(kw["name"], kw["group"]) for kw in inits] == [("vq", "mini"), ("ba", "mini")]


def test_runs_flag_plans_only_the_named_runs_and_names_a_misspelt_one(tmp_path):
    path = write_sweep(tmp_path)
    _, planned = study.plan_sweep(path, seeds=2, only=["ba"])
    assert [(p.run, p.seed) for p in planned] == [("ba", 1337), ("ba", 1338)]
    with pytest.raises(vqvae.VQVAEError, match="no run 'bax'.*did you mean 'ba'"):
        study.plan_sweep(path, only=["bax"])
    assert cli.main(["--runs", "ba"]) == 2                      # --runs goes with --sweep


def test_shipped_published_sweep_makes_its_four_identical_runs_identical():
    """sweeps/ba_study_published.yaml: the published runs 2, 7, 8, 9 differed only in loss weights that
    the published code detached, so here they are one configuration; and the shared base's BA
    options do not reach the VQ-EMA runs."""
    _, planned = study.plan_sweep(ROOT / "sweeps" / "ba_study_published.yaml")
    ba = {p.run: p.cfg for p in planned if p.cfg.quantizer == "ba_vq"}
    same = [vqvae.dataclasses.replace(ba[n], name="") for n in ("ba_default", "ba_high_entropy", "ba_low_entropy",
                                                                "ba_high_commitment")]
    assert all(c == same[0] for c in same)
    defaults = vqvae.Config()
    assert all(getattr(p.cfg, k) == getattr(defaults, k) for p in planned if p.cfg.quantizer == "vq_ema"
               for k in vqvae.BAVQ.options if k not in vqvae.CodebookQuantizer.options)


def test_evaluate_saved_repeats_the_last_validation_and_takes_another_beta(tmp_path):
    sweep(tmp_path, eval_batch_size=16, ba_eval="batch")        # β matters at evaluation with the batch rule
    run = tmp_path / "exp" / "mini" / "ba"
    again = study.evaluate_saved(run)
    for key in ("psnr", "psnr_batch", "perplexity", "usage_rate"):
        assert again[key] == pytest.approx(final(run)[key], rel=1e-6), key
    assert study.evaluate_saved(run, beta=1e-3)["perplexity"] != pytest.approx(again["perplexity"])
    nearest = [study.evaluate_saved(run, beta=b, ba_eval="prior", ba_prior="uniform") for b in (1e-3, 100.0)]
    assert nearest[0] == nearest[1]                                   # the nearest code does not depend on β


def test_distance_scale_reports_the_nearest_code_distances(tmp_path):
    sweep(tmp_path, ba_prior="running")
    scale = study.distance_scale(tmp_path / "exp" / "mini" / "ba", n_images=8)
    assert 0 <= scale["d1"] and 0 <= scale["gap"] and scale["critical_beta"] > 0
    assert scale["beta_gap"] == pytest.approx(final(tmp_path / "exp" / "mini" / "ba")["beta"] * scale["gap"])
    low, mid, high = scale["log_pi_percentiles"]
    assert low <= mid <= high <= 0                                  # log of probabilities
    assert 0 <= scale["prior_moves"] <= 1
    assert "beta_gap" not in study.distance_scale(tmp_path / "exp" / "mini" / "vq", n_images=8)
    # a prior with all its mass on code 0 moves every latent there that was not already nearest to it
    path = tmp_path / "exp" / "mini" / "ba" / "final_model.pt"
    state = torch.load(path, weights_only=True)
    prior = state["model"]["quantizer.prior"]
    state["model"]["quantizer.prior"] = torch.cat([torch.ones(1), torch.zeros(len(prior) - 1)])
    torch.save(state, path)
    model, cfg, test = study.saved_run(path.parent)
    with torch.no_grad():
        z = vqvae.flatten_latents(model.encode(study.model_input(test, 8, cfg.pixel_range))).float()
    not_zero = (vqvae.nearest_code(z, model.quantizer.codebook) != 0).float().mean().item()
    assert study.distance_scale(path.parent, n_images=8)["prior_moves"] == pytest.approx(not_zero)


def test_a_run_saved_before_a_key_existed_still_counts_as_that_run(tmp_path, monkeypatch):
    """A config key added after a run was saved took its default there: the run is skipped, not
    refused (the study of this file resumed runs saved before ba_fast_path existed)."""
    sweep(tmp_path)
    run = tmp_path / "exp" / "mini" / "ba"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["ba_fast_path"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    monkeypatch.setattr(vqvae, "train", lambda *args, **kwargs: pytest.fail("a finished run was trained again"))
    sweep(tmp_path)
    with pytest.raises(vqvae.VQVAEError, match="ba_fast_path: True there, False now"):
        sweep(tmp_path, ba_fast_path=False)


def test_collapse_ends_is_the_first_step_of_a_long_enough_stretch_above_the_level():
    steps = [10, 20, 30, 40, 50, 60, 70, 80]
    # a short excursion above 2 (steps 30–40) does not count; the stretch from 50 on does
    assert study.collapse_ends(steps, [1.0, 1.0, 3.0, 2.5, 1.0, 4.0, 5.0, 6.0], hold=3) == 60
    assert study.collapse_ends(steps, [1.0, 1.0, 3.0, 2.5, 2.1, 1.0, 1.0, 1.0], hold=3) == 30
    assert study.collapse_ends(steps, [9.0] * 8, hold=5) == 10            # never collapsed
    assert study.collapse_ends(steps, [1.0] * 7 + [9.0], hold=2) is None   # never leaves
    assert study.collapse_ends(steps, [3.0, 2.0, 3.0, 3.0], level=2.0, hold=2) == 30  # 2.0 is not above 2.0


def test_critical_beta_is_one_over_twice_the_largest_variance():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 3, generator=g, dtype=torch.float64) * torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    z = z @ rotation.t() + 5.0                            # a rotated, shifted copy: λ_max is still 4
    assert study.critical_beta(z) == pytest.approx(1 / 8, rel=0.05)
    assert study.critical_beta(3 * z) == pytest.approx(study.critical_beta(z) / 9, rel=1e-9)


def test_critical_beta_at_init_sees_the_encoder_that_training_builds(tmp_path):
    cfg = tiny_config(tmp_path, synthetic_size=64, n_hid=8, latent_dim=4, codebook_size=8, seed=3, max_steps=1,
                      lr=1e-12, out_dir=str(tmp_path), name="init")
    images = vqvae.make_synthetic(64, seed=0)
    first = study.critical_beta_at_init(cfg, images, n_images=32)
    assert first == study.critical_beta_at_init(cfg, images, n_images=32)      # the seed fixes it
    assert first != study.critical_beta_at_init(dataclasses.replace(cfg, seed=4), images, n_images=32)
    # a run of that config with a learning rate of 1e-12 keeps its initial encoder: the same latents
    vqvae.train(cfg)
    model = vqvae.load_model(tmp_path / "init" / "final_model.pt").eval()
    x = study.model_input(images, 32, cfg.pixel_range)
    with torch.no_grad():
        assert study.critical_beta(vqvae.flatten_latents(model.encode(x)).float()) == pytest.approx(first, rel=1e-6)


def test_val_curve_averages_each_epoch_over_the_seeds(tmp_path):
    def history(name, psnrs):
        d = tmp_path / name
        d.mkdir()
        lines = [{"split": "train", "step": 1, "epoch": 0, "loss": 1.0}]
        lines += [{"split": "val", "step": 10 * (e + 1), "epoch": e, "psnr": p} for e, p in enumerate(psnrs)]
        (d / "history.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        return {"run": "a", "dir": d}
    records = [history("a", [20.0, 22.0]), history("a_seed2", [21.0, 23.0, 24.0]), {"run": "b", "dir": tmp_path}]
    curve = study.val_curve(records, "a")
    assert curve["epoch"] == [1, 2, 3] and curve["n"] == [2, 2, 1]
    assert curve["mean"][:2] == [20.5, 22.5] and curve["mean"][2] == 24.0
    assert curve["std"][0] == pytest.approx(statistics.stdev([20.0, 21.0])) and curve["std"][2] != curve["std"][2]


def test_gradient_alignment_leaves_the_run_alone_and_compares_like_with_like(tmp_path):
    cfg = tiny_config(tmp_path, synthetic_size=64, n_hid=8, latent_dim=4, codebook_size=8, quantizer="ba_vq",
                      beta_units="relative", beta_start=1.0, beta_end=10.0, out_dir=str(tmp_path), name="ba")
    vqvae.train(cfg)
    rows = study.gradient_alignment(tmp_path / "ba", betas=(1.0, 1000.0), n_images=16)
    # each β starts from the saved model: a training forward at β = 1000 first changes nothing at β = 1
    assert study.gradient_alignment(tmp_path / "ba", betas=(1000.0, 1.0), n_images=16)[1] == rows[0]
    assert [r["beta"] for r in rows] == [1.0, 1000.0]
    for r in rows:
        assert -1.0 <= r["cosine"] <= 1.0 and r["norm_ratio"] > 0 and 0.0 < r["top1pct_share"] <= 1.0
    # at a huge β p(k|e) is one-hot for almost every latent: the soft path's gradient all but vanishes
    # there and sits on the few latents at a boundary between two codes
    assert rows[1]["top1pct_share"] > rows[0]["top1pct_share"]


def test_last_step_reseeds_counts_the_codes_placed_at_the_final_step(tmp_path):
    sweep(tmp_path, path=write_sweep(tmp_path, runs=[{"name": "vq", "quantizer": "vq_ema", "dead_code_threshold": 0.5},
                                                     {"name": "plain", "quantizer": "vq_ema"},
                                                     {"name": "all", "quantizer": "vq_ema", "dead_code_threshold": 1e9}]))
    # a threshold no code reaches re-seeds every code at every step, the last one included
    everything = study.last_step_reseeds(tmp_path / "exp" / "mini" / "all")
    assert everything["reseeded"] == TINY["codebook_size"] and everything["share"] == 1.0
    run = tmp_path / "exp" / "mini" / "vq"
    # a hand-made end state: codes 0 and 1 re-seeded at the last step, code 0 used 3 times of 20
    state = torch.load(run / "final_model.pt", weights_only=True)
    size = state["model"]["quantizer.cluster_size"]
    size.fill_(5.0)
    size[:2] = 0.5
    torch.save(state, run / "final_model.pt")
    counts = [3, 0, 7, 10] + [0] * (TINY["codebook_size"] - 4)
    (run / "code_counts.json").write_text(json.dumps({"counts": counts}))
    assert study.last_step_reseeds(run) == {"reseeded": 2, "used": 1, "used_all": 3, "share": pytest.approx(3 / 20)}
    with pytest.raises(vqvae.VQVAEError, match="no dead-code re-seeding"):
        study.last_step_reseeds(tmp_path / "exp" / "mini" / "plain")


def test_soft_spread_at_init_runs_from_all_codes_to_one_as_beta_grows():
    cfg = vqvae.validate(vqvae.Config(**{**TINY, "quantizer": "ba_vq", "beta_units": "relative"}))
    images = vqvae.make_synthetic(256, seed=0)
    K = cfg.codebook_size
    tiny, one, ten, huge = study.soft_spread_at_init(cfg, images, betas=(1e-9, 1.0, 10.0, 1e6), n_images=16)
    assert tiny == pytest.approx(K, rel=1e-4)                # β → 0: p(k|e) uniform over the K codes
    assert huge == pytest.approx(1.0, abs=1e-4)              # β → ∞: the nearest code alone
    assert K > one > ten > 1.0
    again = study.soft_spread_at_init(cfg, images, betas=(1.0,), n_images=16)
    assert again == [one]                                    # the same seeds give the same initial state
    with pytest.raises(vqvae.VQVAEError, match="ba_vq"):
        study.soft_spread_at_init(dataclasses.replace(cfg, quantizer="vq_ema"), images)


def test_gradient_alignment_feeds_the_quantizer_what_training_does(tmp_path, monkeypatch):
    """With latent_norm l2 the quantizer sees unit-length latents (VQVAE.encode), not the raw encoder output."""
    cfg = tiny_config(tmp_path, synthetic_size=64, n_hid=8, latent_dim=4, codebook_size=8, quantizer="ba_vq",
                      latent_norm="l2", max_steps=2, out_dir=str(tmp_path), name="ba")
    vqvae.train(cfg)
    norms, forward = [], vqvae.BAVQ.forward
    monkeypatch.setattr(vqvae.BAVQ, "forward", lambda self, z_e: norms.append(z_e.norm(dim=1)) or forward(self, z_e))
    study.gradient_alignment(tmp_path / "ba", betas=(1.0,), n_images=4)
    assert norms and all(torch.allclose(n, torch.ones_like(n), atol=1e-5) for n in norms)


@pytest.mark.parametrize("sweep_file,study_dir,flags", [
    ("ba_study.yaml", "ba_study", {}),
    ("ba_study_published.yaml", "ba_study_published", {}),
    ("ba_wins.yaml", "ba_wins", {}),
    ("ba_wins.yaml", "ba_wins_screen", {"epochs": 2}),
    ("ba_collapse.yaml", "ba_collapse", {}),
])
def test_committed_runs_still_count_as_the_runs_of_their_sweep(sweep_file, study_dir, flags):
    """Every finished run under results/ matches its sweep file as it is now (old value names, retired
    keys and the base's options of other quantizers included), so the sweep command skips it, and
    --summarize reads the study."""
    flags = {"dataset": "folder", "data_dir": "unused", "out_dir": str(ROOT / "results")} | flags
    _, planned = study.plan_sweep(ROOT / "sweeps" / sweep_file, flags=flags, seeds=3)
    for p in planned:
        p.cfg = dataclasses.replace(p.cfg, out_dir=str(ROOT / "results" / study_dir))
    found = [p for p in planned if study.run_state(p.dir) == "done"]
    assert len(found) >= 5
    study.check_existing(found)
    assert all(row["seeds"] >= 1 for row in study.summary_rows(ROOT / "results" / study_dir))


def test_a_sweep_that_cannot_run_under_torchrun_is_refused_before_its_first_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(vqvae.VQVAEError, match="ba_grad_through_iters and ba_eval batch run in one process only"):
        study.plan_sweep(ROOT / "sweeps" / "ba_study_published.yaml")


def test_flags_beside_a_sweep_reach_the_runs_that_use_them_and_no_others(tmp_path):
    _, planned = study.plan_sweep(write_sweep(tmp_path), flags={"ba_iters": 3, "grad_estimator": "rotation"})
    assert {p.run: (p.cfg.ba_iters, p.cfg.grad_estimator) for p in planned} == {"vq": (1, "rotation"),
                                                                                "ba": (3, "ste")}
    with pytest.raises(vqvae.VQVAEError, match="--fsq_levels applies to none of the planned runs"):
        study.plan_sweep(write_sweep(tmp_path), flags={"fsq_levels": "4,4"})


def rd_record(run, quantizer, seed, bpp, psnr, **config):
    return {"run": run, "seed": seed, "config": {"quantizer": quantizer, **config},
            "final": {"bits_per_pixel": bpp, "bits_per_index": bpp * 16, "psnr": psnr}}


def test_rd_points_and_the_frontier_between_neighbouring_rates():
    records = [rd_record("vq_k16", "vq_ema", 1, 0.25, 20.0), rd_record("vq_k64", "vq_ema", 1, 0.375, 21.0),
               rd_record("vq_k64", "vq_ema", 2, 0.375, 23.0), rd_record("ba", "ba_vq", 1, 0.3, 22.5),
               rd_record("vqr", "vq_ema", 1, 0.3, 21.0, dead_code_threshold=1.0),
               {"run": "old", "seed": 1, "config": {"quantizer": "vq_ema"}, "final": {"psnr": 20.0}}]
    points = {p["run"]: p for p in study.rd_points(records)}
    assert set(points) == {"vq_k16", "vq_k64", "ba", "vqr"}                # a run without rate metrics is left out
    assert points["vq_k64"]["psnr"] == 22.0 and points["vq_k64"]["seeds"] == 2
    assert points["vqr"]["family"] == "vq_ema, re-seeded" and points["ba"]["family"] == "ba_vq"
    # vq_ema at 0.3 bits/pixel: 2/5 of the way from (0.25, 20) to (0.375, 22)
    assert study.frontier_psnr(list(points.values()), "vq_ema", 0.3) == pytest.approx(20.8)
    assert study.frontier_psnr(list(points.values()), "vq_ema", 0.5) is None  # outside the measured range


def test_the_frontier_is_the_envelope_that_no_lower_rate_run_beats():
    line = [(0.2, 20.0, "a"), (0.3, 21.0, "b"), (0.35, 20.5, "c"), (0.4, 22.0, "d"), (0.4, 22.5, "e")]
    assert study.envelope(line) == [(0.2, 20.0, "a"), (0.3, 21.0, "b"), (0.4, 22.5, "e")]
    # c is beaten by b at a lower rate, so 0.35 lies between b and e: 21 + 1.5 / 2
    assert study.frontier_at(line, 0.35) == (pytest.approx(21.75), "b", "e")
    assert study.frontier_at(line, 0.4) == (22.5, "b", "e")
    assert study.frontier_at(line, 0.1) is None and study.frontier_at(line, 0.41) is None


def test_matched_rate_pairs_each_seed_with_the_frontier_of_the_same_seed():
    records = [rd_record("k1", "vq_ema", 1, 0.2, 20.0), rd_record("k2", "vq_ema", 1, 0.4, 22.0),
               rd_record("k1", "vq_ema", 2, 0.2, 21.0), rd_record("k2", "vq_ema", 2, 0.4, 21.0),
               rd_record("ba", "ba_vq", 1, 0.3, 21.5), rd_record("ba", "ba_vq", 2, 0.4, 21.5),
               rd_record("ba", "ba_vq", 3, 0.3, 30.0)]          # no vq_ema run of seed 3: not compared
    [row] = study.matched_rate(study.rd_points(records), "ba_vq", "vq_ema")
    # seed 1: frontier 21.0 at 0.3. Seed 2: k2 (0.4, 21) does not beat k1 (0.2, 21), so that seed's
    # envelope ends at 0.2, the run's rate 0.4 lies outside it, and only seed 1 is compared
    assert row["diffs"] == {1: pytest.approx(0.5)} and row["neighbours"] == ["k1", "k2"]
    records[3] = rd_record("k2", "vq_ema", 2, 0.4, 21.2)
    [row] = study.matched_rate(study.rd_points(records), "ba_vq", "vq_ema")
    assert row["diffs"] == {1: pytest.approx(0.5), 2: pytest.approx(0.3)}
    assert row["diff"] == pytest.approx(0.4) and row["diff_min"] == pytest.approx(0.3)
    assert row["diff_std"] == pytest.approx(math.sqrt(0.02))


def test_saturation_names_the_first_run_within_a_tenth_of_a_decibel_of_the_best():
    records = [rd_record(f"k{k}", "vq_ema", 1, bpp, q) for k, bpp, q in
               [(16, 0.2, 20.0), (64, 0.3, 21.0), (256, 0.35, 21.35), (1024, 0.36, 21.4)]]
    records += [rd_record(f"r{k}", "vq_ema", 1, bpp, q, dead_code_threshold=1.0) for k, bpp, q in
                [(16, 0.2, 20.0), (64, 0.3, 21.0), (256, 0.4, 22.0)]]
    points = study.rd_points(records)
    plain = study.saturation(points, "vq_ema")
    assert (plain["best"], plain["saturates"], plain["rising"]) == ("k1024", "k256", False)
    assert study.saturation(points, "vq_ema, re-seeded")["rising"]
    text = study.rd_markdown(points)
    assert "| vq_ema | k1024 | 0.360 | 21.40 | k256 | 0.350 |" in text
    assert study.rd_markdown([p for p in points if p["family"] == "vq_ema"]) == ""   # one family: nothing to compare
