import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vqvae  # noqa: E402

# Under pytest-xdist (the README's `-n 2`) each worker gets its share of the cores, not all of them:
# two workers with two threads each on two cores would only take turns.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# The one tiny configuration of the suite: trains in a second or two on CPU (synthetic data, small
# model, few codes). Tests take it as it is or change a few keys.
TINY = dict(dataset="synthetic", synthetic_size=256, batch_size=32, epochs=1, codebook_size=32, n_hid=16, latent_dim=8,
            log_every=2, eval_batch_size=64, wandb=False, device="cpu")


def tiny_config(tmp_path, **overrides):
    """TINY as a Config, writing to tmp_path/experiments/run, with overrides; keys of TINY that the
    chosen quantizer does not use (codebook_size for fsq) are left out."""
    values = TINY | dict(out_dir=str(tmp_path / "experiments"), name="run")
    values = vqvae.applicable(values, overrides.get("quantizer", "vq_ema")) | overrides
    return vqvae.load_config(overrides=values)


def set_chunk_rows(monkeypatch, rows: int, codebook_size: int) -> None:
    """Make the quantizers' N×K work run in chunks of `rows` rows."""
    monkeypatch.setattr(vqvae, "CHUNK_ELEMENTS", rows * codebook_size)
    monkeypatch.setattr(vqvae, "MIN_CHUNK_ROWS", 1)


def interrupt_on_call(monkeypatch, name: str, n: int):
    """Make vqvae.<name> raise KeyboardInterrupt on its n-th call (a crash at that point of a run).
    Returns a function that puts the real one back."""
    real, calls = getattr(vqvae, name), []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(vqvae, name, dying)
    return lambda: monkeypatch.setattr(vqvae, name, real)
