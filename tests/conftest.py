import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vqvae  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_config(tmp_path, **overrides):
    """A config that trains in a second or two on CPU: synthetic data, small model, few codes."""
    values = dict(dataset="synthetic", synthetic_size=256, batch_size=32, epochs=1, codebook_size=32,
                  n_hid=16, latent_dim=8, log_every=2, eval_batch_size=64, wandb=False,
                  out_dir=str(tmp_path / "experiments"), name="run", device="cpu")
    values.update(overrides)
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
