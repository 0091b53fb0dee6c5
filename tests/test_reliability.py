"""Interrupted runs resume bitwise, faults stop cleanly with a good checkpoint kept, W&B never costs a run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import kill_resume
import train as cli
import study
import vqvae
import wandb_log
from conftest import interrupt_on_call, tiny_config

pytestmark = pytest.mark.slow  # processes, whole runs or W&B: the full suite only (pytest -m "not slow" skips)

TIMING = ("train_time_s", "train_images_per_s", "seconds")


def results(metrics):
    return {k: v for k, v in metrics.items() if k not in TIMING}


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
def test_killed_processes_resume_bitwise(tmp_path):
    """Real processes: SIGKILL mid-epoch (resumes from the last save_every_steps checkpoint) and
    SIGINT (finishes the step, writes last.pt, exits 130)."""
    trials = kill_resume.run_trials(tmp_path, [("ba_vq", 11, signal.SIGKILL), ("ba_vq", 22, signal.SIGINT)])
    killed, interrupted = trials
    assert killed["exit_code"] == -signal.SIGKILL and killed["last_pt_step"] % 3 == 0
    assert interrupted["exit_code"] == 130 and interrupted["last_pt_step"] == interrupted["stopped_after_step"]
    assert "--resume" in interrupted["stderr_tail"][0]
    assert all(t["bitwise_equal"] for t in trials), trials


@pytest.mark.parametrize("quantizer,extra", [("vq_ema", {"dead_code_threshold": 2.0}), ("ba_vq", {"ba_prior": "running"}),
                                             ("vq_ema", {"augment": "crop_flip"}),
                                             ("ba_vq", {"augment": "crop_flip", "pixel_range": "unit", "ba_iters": 2,
                                                        "ba_prior": "running", "ba_eval": "batch",
                                                        "ba_codebook_update": "grad_ema",
                                                        "ba_grad_through_iters": True})])
def test_resume_from_a_mid_epoch_checkpoint_is_bitwise(tmp_path, monkeypatch, quantizer, extra):
    cfg = tiny_config(tmp_path, quantizer=quantizer, epochs=2, save_every_steps=3, **extra)
    reference = vqvae.train(vqvae.dataclasses.replace(cfg, name="whole"))
    restore = interrupt_on_call(monkeypatch, "train_step", 12)  # inside epoch 2 (8 steps each); last.pt: step 9
    with pytest.raises(KeyboardInterrupt):
        vqvae.train(cfg)
    restore()
    state = vqvae.load_checkpoint(vqvae.run_dir_of(cfg) / "last.pt")
    assert (state["step"], state["epoch"], state["epoch_step"]) == (9, 1, 1)
    resumed = vqvae.train(cfg, resume=True)
    assert results(resumed) == results(reference)
    a = torch.load(vqvae.run_dir_of(cfg) / "final_model.pt")["model"]
    b = torch.load(tmp_path / "experiments" / "whole" / "final_model.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in b if isinstance(b[k], torch.Tensor))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_after_the_step_with_a_checkpoint(tmp_path, monkeypatch, sig):
    cfg = tiny_config(tmp_path, epochs=2)
    real_step, calls = vqvae.train_step, []
    before = signal.getsignal(sig)

    def step_and_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), sig)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(vqvae, "train_step", step_and_signal)
    with pytest.raises(vqvae.RunStopped, match=f"stopped by {sig.name} at step 5.*--resume") as stopped:
        vqvae.train(cfg)
    assert stopped.value.exit_code == 128 + sig
    assert vqvae.load_checkpoint(vqvae.run_dir_of(cfg) / "last.pt")["step"] == 5
    assert signal.getsignal(sig) is before                                    # handler restored


def test_a_second_signal_stops_at_once():
    with pytest.raises(KeyboardInterrupt):
        with vqvae.StopSignals() as signals:
            os.kill(os.getpid(), signal.SIGINT)
            assert signals.received == signal.SIGINT                         # the first only sets the flag
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)                                                     # (not reached)


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, epochs=2, save_every_steps=2, log_every=3)
    real_batch = vqvae.get_batch
    step = []

    def poisoned(*args, **kwargs):
        step.append(1)
        x = real_batch(*args, **kwargs)
        return x * float("nan") if len(step) == 5 else x

    monkeypatch.setattr(vqvae, "get_batch", poisoned)
    with pytest.raises(vqvae.RunStopped, match=r"non-finite value at step 5 \(recon nan.*grad_norm nan") as stopped:
        vqvae.train(cfg)
    assert stopped.value.exit_code == 3 and "last good checkpoint is" in str(stopped.value)
    state = vqvae.load_checkpoint(vqvae.run_dir_of(cfg) / "last.pt")
    assert state["step"] == 4                                    # written before the bad step, not after
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_detect_anomaly_flag_turns_on_autograd_anomaly_detection(tmp_path, monkeypatch):
    seen = []
    real = vqvae.train_step

    def spy(*args, **kwargs):
        seen.append(torch.is_anomaly_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(vqvae, "train_step", spy)
    vqvae.train(tiny_config(tmp_path, max_steps=2, detect_anomaly=True))
    vqvae.train(tiny_config(tmp_path, name="off", max_steps=2))
    assert seen == [True, True, False, False] and not torch.is_anomaly_enabled()


def test_a_checkpoint_that_cannot_be_written_stops_the_run(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, epochs=3)
    real_save, saves = vqvae.atomic_torch_save, []

    def disk_full_on_second(obj, path):
        saves.append(path)
        if len(saves) == 3:  # last.pt, checkpoint_epoch1.pt, then last.pt of epoch 2
            raise OSError(28, "No space left on device")
        return real_save(obj, path)

    monkeypatch.setattr(vqvae, "atomic_torch_save", disk_full_on_second)
    with pytest.raises(vqvae.RunStopped, match="No space left on device.*last good checkpoint is .*last.pt \\(step 8\\)"):
        vqvae.train(cfg)
    assert vqvae.load_checkpoint(vqvae.run_dir_of(cfg) / "last.pt")["step"] == 8


def test_corrupt_checkpoint_names_the_file_and_the_newest_good_one(tmp_path):
    cfg = tiny_config(tmp_path, epochs=2)
    vqvae.train(cfg)
    run = vqvae.run_dir_of(cfg)
    (run / "final_metrics.json").unlink()
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 2])            # truncated
    with pytest.raises(vqvae.VQVAEError, match=r"cannot read checkpoint .*last.pt .*newest readable checkpoint is "
                                               r".*checkpoint_epoch2.pt \(step 16\)"):
        vqvae.train(cfg, resume=True)
    (run / "checkpoint_epoch2.pt").replace(run / "last.pt")           # what the message says to do
    assert vqvae.train(cfg, resume=True)["steps"] == 16


def test_resume_lists_every_key_that_changes_the_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=2)
    vqvae.train(cfg)
    with pytest.raises(vqvae.VQVAEError, match=r"quantizer \(vq_ema in the checkpoint, ba_vq now\), "
                                               r"codebook_size \(32 in the checkpoint, 16 now\)"):
        vqvae.train(vqvae.dataclasses.replace(cfg, quantizer="ba_vq", codebook_size=16), resume=True)
    # every result-changing key is refused, as a sweep refuses it: the one list of vqvae.RUNTIME_KEYS
    with pytest.raises(vqvae.VQVAEError, match=r"commitment_weight \(0.25 in the checkpoint, 0.5 now\)"):
        vqvae.train(vqvae.dataclasses.replace(cfg, commitment_weight=0.5), resume=True)
    # keys that may change: the run's length, logging
    final = vqvae.train(vqvae.dataclasses.replace(cfg, max_steps=4, log_every=1, wandb=False), resume=True)
    assert final["steps"] == 4


def test_resume_refuses_a_ba_option_that_a_sweep_would_refuse(tmp_path):
    cfg = tiny_config(tmp_path, quantizer="ba_vq", max_steps=2)
    vqvae.train(cfg)
    with pytest.raises(vqvae.VQVAEError, match=r"ba_output \(hard_soft_grad in the checkpoint, soft now\)"):
        vqvae.train(vqvae.dataclasses.replace(cfg, ba_output="soft", max_steps=4), resume=True)


def wandb_records(run_dir: Path) -> list:
    """The records of the run's offline W&B log, read with wandb's own reader."""
    [log] = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-500:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def wandb_history(run_dir: Path) -> list:
    return [r["history"]["item"] | {"_step": r["history"].get("step", {}).get("num")}
            for r in wandb_records(run_dir) if r.get("type") == "history"]


def test_wandb_offline_run_holds_what_a_user_compares(tmp_path, monkeypatch):
    """Per run: the config, the study group, every loss term, batch perplexity and usage, β,
    the validation metrics, the reconstruction grid as an image and the code-usage histogram."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_config(tmp_path, wandb=True, quantizer="ba_vq", max_steps=4, log_every=1, synthetic_size=128,
                      eval_batch_size=16, wandb_group="mystudy")
    final = vqvae.train(cfg)
    run_dir = vqvae.run_dir_of(cfg)
    records = wandb_records(run_dir)
    [run] = [r["run"] for r in records if r.get("type") == "run"]
    config = run["config"]["update"]
    assert all(config[k] == v for k, v in vqvae.dataclasses.asdict(cfg).items()), config
    assert any('"run_group": "mystudy"' in json.dumps(r) for r in records)     # the study's W&B group
    rows = wandb_history(run_dir)
    local = [r for r in study.read_history(run_dir) if r["split"] == "train"]
    for key in ("loss", "recon", "commitment", "entropy", "codebook", "perplexity", "usage", "beta"):
        assert [r[f"train/{key}"] for r in rows if f"train/{key}" in r] == pytest.approx([r[key] for r in local]), key
    [val] = [r for r in rows if "val/psnr" in r]
    for key in ("psnr", "psnr_batch", "perplexity", "perplexity_batch", "usage_rate", "usage_batch", "beta"):
        assert val[f"val/{key}"] == pytest.approx(final[key]), key
    assert val["val/reconstructions._type"] == "image-file"
    grid = vqvae.recon_grid(vqvae.load_model(run_dir / "final_model.pt"), torch.zeros(8, 3, 32, 32, dtype=torch.uint8))
    assert (val["val/reconstructions.height"], val["val/reconstructions.width"]) == grid.shape[:2]
    assert val["val/code_usage._type"] == "histogram"
    assert sum(val["val/code_usage.values"]) == cfg.codebook_size          # one entry per code


def test_wandb_logged_in_without_network_falls_back_in_seconds(tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)                   # looks logged in
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")       # nothing listens there
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_config(tmp_path, wandb=True, max_steps=2)
    t0 = time.perf_counter()
    vqvae.train(cfg)
    assert time.perf_counter() - t0 < 15                           # training itself takes a second or two
    assert (vqvae.run_dir_of(cfg) / "final_metrics.json").is_file()
    assert len(list(vqvae.run_dir_of(cfg).glob("wandb/offline-run-*"))) == 1
    assert "server not reachable; logging offline" in capsys.readouterr().out


def test_wandb_crash_mid_run_does_not_end_training(tmp_path, monkeypatch, capsys):
    class Broken:
        def log(self, *args, **kwargs):
            raise RuntimeError("wandb internal error")

        def finish(self):
            raise RuntimeError("still broken")

    monkeypatch.setattr(vqvae, "start_wandb", lambda *args: wandb_log.SafeWandb(Broken()))
    final = vqvae.train(tiny_config(tmp_path, max_steps=4))
    assert final["steps"] == 4 and "continuing without W&B" in capsys.readouterr().out


def test_deterministic_mode_gives_the_same_run_and_is_switched_off_after(tmp_path):
    """deterministic: true runs under torch.use_deterministic_algorithms (an operation without a
    deterministic kernel would raise); here, on CPU, it gives the same bits as the default."""
    plain = vqvae.train(tiny_config(tmp_path, name="plain", quantizer="ba_vq", max_steps=4))
    strict = vqvae.train(tiny_config(tmp_path, name="strict", quantizer="ba_vq", max_steps=4, deterministic=True,
                                     augment="crop_flip"))
    again = vqvae.train(tiny_config(tmp_path, name="again", quantizer="ba_vq", max_steps=4, augment="crop_flip"))
    assert results(strict) == results(again) and results(plain) != results(strict)
    assert not torch.are_deterministic_algorithms_enabled()
