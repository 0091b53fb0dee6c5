import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train as cli
import study
import vqvae
from conftest import interrupt_on_call, tiny_config

ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = ("train_time_s", "train_images_per_s", "seconds")


def results(metrics):
    return {k: v for k, v in metrics.items() if k not in TIMING_KEYS}


def test_cli_run_writes_every_result_file(tmp_path):
    out = tmp_path / "exp"
    code = cli.main(["--dataset", "synthetic", "--synthetic_size", "256", "--batch_size", "32", "--epochs", "2",
                     "--codebook_size", "32", "--quantizer", "ba_vq", "--log_every", "2", "--no_wandb",
                     "--out_dir", str(out), "--name", "r", "--device", "cpu"])
    assert code == 0
    run = out / "r"
    for name in ("config.yaml", "history.jsonl", "final_metrics.json", "final_model.pt", "last.pt", "recon.png",
                 "checkpoint_epoch1.pt", "checkpoint_epoch2.pt"):
        assert (run / name).is_file(), name
    final = json.loads((run / "final_metrics.json").read_text())
    for key in ("psnr", "psnr_legacy", "mse", "perplexity", "usage_rate", "dead_codes", "beta", "epochs", "steps",
                "train_time_s", "train_images_per_s"):
        assert key in final, key
    assert final["steps"] == 2 * (256 // 32) and final["beta"] == pytest.approx(3.0)
    history = study.read_history(run)
    train_rows = [r for r in history if r["split"] == "train"]
    val_rows = [r for r in history if r["split"] == "val"]
    assert len(train_rows) == 8 and len(val_rows) == 2
    assert {"recon", "commitment", "entropy", "codebook", "loss", "perplexity", "usage", "beta"} <= set(train_rows[0])
    assert val_rows[-1]["psnr"] == pytest.approx(final["psnr"])
    saved = vqvae.read_yaml(run / "config.yaml")
    assert saved["codebook_size"] == 32 and saved["latent_dim"] == 64  # resolved, presets filled in
    model = vqvae.load_model(run / "final_model.pt")
    assert model.quantizer.beta == pytest.approx(3.0)


def test_final_metrics_match_an_independent_evaluation(tmp_path):
    cfg = tiny_config(tmp_path)
    final = vqvae.train(cfg)
    model = vqvae.load_model(vqvae.run_dir_of(cfg) / "final_model.pt")
    _, test = vqvae.load_dataset(cfg)
    x = vqvae.to_device_uint8(test, torch.device("cpu"))
    with torch.no_grad():
        x_hat, _, idx = model(vqvae.normalize(x))
    mse01 = ((x_hat + 1) / 2 - (vqvae.normalize(x) + 1) / 2).pow(2).mean().item()
    assert final["mse"] == pytest.approx(mse01, rel=1e-4)
    assert final["perplexity"] == pytest.approx(vqvae.perplexity(torch.bincount(idx.flatten(), minlength=32)))


def test_final_metrics_say_where_the_time_went(tmp_path):
    cfg = tiny_config(tmp_path, epochs=2, checkpoint_freq=1)
    t0 = time.perf_counter()
    final = vqvae.train(cfg)
    wall = time.perf_counter() - t0
    seconds = final["seconds"]
    assert list(seconds) == list(vqvae.PHASES)
    assert all(v > 0 for v in seconds.values()), seconds
    assert sum(seconds.values()) <= wall + 0.01  # disjoint phases, each rounded to the millisecond
    saved = json.loads((vqvae.run_dir_of(cfg) / "final_metrics.json").read_text())
    assert saved["seconds"] == seconds
    assert final["steps"] * 32 / final["train_images_per_s"] == pytest.approx(seconds["steps"], abs=1e-3)


@pytest.mark.parametrize("quantizer", ["vq_ema", "ba_vq"])
def test_same_seed_same_result(tmp_path, quantizer):
    a = vqvae.train(tiny_config(tmp_path, name="a", quantizer=quantizer))
    b = vqvae.train(tiny_config(tmp_path, name="b", quantizer=quantizer))
    c = vqvae.train(tiny_config(tmp_path, name="c", quantizer=quantizer, seed=7))
    assert results(a) == results(b)
    assert results(a) != results(c)


def test_existing_results_are_not_overwritten(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=2)
    vqvae.train(cfg)
    before = (vqvae.run_dir_of(cfg) / "final_metrics.json").read_text()
    with pytest.raises(vqvae.VQVAEError, match="already holds results"):
        vqvae.train(cfg)
    assert (vqvae.run_dir_of(cfg) / "final_metrics.json").read_text() == before
    vqvae.train(cfg, overwrite=True)


@pytest.mark.parametrize("quantizer,extra", [
    ("vq_ema", {}),
    ("ba_vq", {"ba_prior": "running"}),
    ("vq_ema", {"grad_estimator": "rotation", "dead_code_threshold": 2.0}),  # re-seeding draws from the RNG
    ("ba_vq", {"beta_units": "relative"}),  # σ and whether it was measured travel in the checkpoint
])
@pytest.mark.slow
def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, monkeypatch, quantizer, extra):
    cfg = tiny_config(tmp_path, quantizer=quantizer, epochs=3, **extra)
    reference = vqvae.train(dataclasses_replace(cfg, name="whole"))
    ref_model = torch.load(tmp_path / "experiments" / "whole" / "final_model.pt")["model"]

    restore = interrupt_on_call(monkeypatch, "evaluate", 2)  # end of epoch 2, before its checkpoint
    with pytest.raises(KeyboardInterrupt):
        vqvae.train(cfg)
    restore()
    assert vqvae.load_checkpoint(tmp_path / "experiments" / "run" / "last.pt")["step"] == 256 // 32  # epoch 1's checkpoint
    resumed = vqvae.train(cfg, resume=True)
    assert results(resumed) == results(reference)
    model = torch.load(tmp_path / "experiments" / "run" / "final_model.pt")["model"]
    assert all(torch.equal(model[k], ref_model[k]) for k in ref_model if not k.endswith("_extra_state"))
    steps = [r["step"] for r in study.read_history(tmp_path / "experiments" / "run") if r["split"] == "train"]
    assert steps == sorted(set(steps))  # no duplicated records from the interrupted epoch
    assert resumed["seconds"]["kmeans"] > 0  # timed in the first session only: the checkpoint carried it


def dataclasses_replace(cfg, **changes):
    import dataclasses

    return dataclasses.replace(cfg, **changes)


def test_resume_refuses_a_different_codebook_size(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=2)
    vqvae.train(cfg)
    with pytest.raises(vqvae.VQVAEError, match="codebook_size"):
        vqvae.train(dataclasses_replace(cfg, codebook_size=16), resume=True)


def test_resume_without_checkpoint_is_refused(tmp_path):
    with pytest.raises(vqvae.VQVAEError, match="no checkpoint"):
        vqvae.train(tiny_config(tmp_path), resume=True)


def test_batch_larger_than_dataset_is_refused_before_work(tmp_path):
    with pytest.raises(vqvae.VQVAEError, match="larger than the training set"):
        vqvae.train(tiny_config(tmp_path, batch_size=512))
    assert not (tmp_path / "experiments" / "run" / "config.yaml").exists()


def test_kmeans_with_too_few_vectors_is_refused(tmp_path):
    with pytest.raises(vqvae.VQVAEError, match="codebook_init kmeans needs"):
        vqvae.train(tiny_config(tmp_path, synthetic_size=32, codebook_size=4096))


@pytest.mark.parametrize("quantizer,extra", [
    ("ba_vq", dict(ba_iters=3, ba_codebook_update="ema", ba_output="soft")),
    ("vq_ema", dict(codebook_init="uniform", precision="bf16", arch="resnet", n_hid=8, latent_dim=8)),
    ("ba_vq", dict(ba_output="hard_ste", beta_units="critical", latent_norm="l2", ba_prior="running")),
    ("fsq", dict(fsq_levels=[4, 3, 2], latent_norm="l2", precision="bf16")),
    ("vq_ema", dict(latent_norm="l2", dead_code_threshold=1.0)),
])
def test_other_options_train(tmp_path, quantizer, extra):
    final = vqvae.train(tiny_config(tmp_path, quantizer=quantizer, max_steps=3, **extra))
    assert final["steps"] == 3 and torch.isfinite(torch.tensor(final["psnr"]))


@pytest.mark.slow
def test_misspelt_key_exits_nonzero_naming_the_nearest(tmp_path):
    """The real command line: exit status and one line on stderr, before any work."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("quantizer: ba_vq\nentropy_wieght: 0.1\n")
    proc = subprocess.run([sys.executable, "train.py", "--config", str(bad), "--out_dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown config key 'entropy_wieght'" in proc.stderr and "did you mean 'entropy_weight'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir()) or list(tmp_path.iterdir()) == [bad]


@pytest.mark.parametrize("quantizer,extra", [("vq_ema", {}), ("ba_vq", {"beta_start": 20.0, "beta_end": 20.0})])
def test_training_learns(tmp_path, quantizer, extra):
    """Over 50 steps on the synthetic images the reconstruction loss falls well below where it
    started. (BA gets a β that is large for this tiny model's distances: at the default 0.5 → 3 its
    hard codes collapse onto one code within ten steps here and the loss stays flat — the scale
    problem of β.)"""
    cfg = tiny_config(tmp_path, quantizer=quantizer, epochs=7, max_steps=50, log_every=1, lr=2e-3, **extra)
    vqvae.train(cfg)
    recon = [r["recon"] for r in study.read_history(vqvae.run_dir_of(cfg)) if r["split"] == "train"]
    assert len(recon) == 50
    assert sum(recon[-5:]) / 5 < 0.85 * sum(recon[:5]) / 5


def test_beta_follows_its_schedule_at_every_logged_step(tmp_path):
    cfg = tiny_config(tmp_path, quantizer="ba_vq", epochs=3, log_every=1, beta_start=0.2, beta_end=4.0)
    vqvae.train(cfg)
    history = study.read_history(vqvae.run_dir_of(cfg))
    total = 3 * (256 // 32)
    train = [r for r in history if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, total + 1))
    schedule = vqvae.make_quantizer(cfg)
    for r in train:  # the record of step s was trained with β of step index s − 1
        schedule.before_step(r["step"] - 1, total)
        assert r["beta"] == pytest.approx(schedule.beta)
    assert train[0]["beta"] == pytest.approx(0.2) and train[-1]["beta"] == pytest.approx(4.0)


def test_load_model_reads_weights_only_and_asks_before_unpickling_a_full_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=2)
    vqvae.train(cfg)
    run = vqvae.run_dir_of(cfg)
    assert isinstance(vqvae.load_model(run / "final_model.pt"), vqvae.VQVAE)      # weights-only suffices
    with pytest.raises(vqvae.VQVAEError, match=r"weights-only .*trusted=True"):
        vqvae.load_model(run / "last.pt")                                      # RNG states need a full unpickle
    assert isinstance(vqvae.load_model(run / "last.pt", trusted=True), vqvae.VQVAE)


@pytest.mark.parametrize("quantizer", ["vq_ema", "ba_vq"])
@pytest.mark.parametrize("norm", ["l2", "none"])
def test_l2_latent_norm_puts_latents_on_the_unit_sphere_whatever_the_encoder_scale(tmp_path, quantizer, norm):
    """latent_norm l2: every latent the quantizer sees has length one, so scaling the encoder's last
    layer changes nothing downstream (codes, reconstruction); without it, it does."""
    model = vqvae.build_model(tiny_config(tmp_path, quantizer=quantizer, latent_norm=norm), torch.device("cpu")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.quantizer.codebook.normal_()  # codes of unequal lengths: the nearest one depends on the latent's length
        lengths = model.encode(x).norm(dim=1)
        x_hat, _, idx = model(x)
        last = model.encoder[-1]
        last.weight.mul_(5.0)
        last.bias.mul_(5.0)
        x_hat5, _, idx5 = model(x)
    if norm == "l2":
        assert torch.allclose(lengths, torch.ones_like(lengths), atol=1e-5)
        assert torch.equal(idx, idx5) and torch.allclose(x_hat, x_hat5, atol=1e-5)
    else:
        assert not torch.equal(idx, idx5)
