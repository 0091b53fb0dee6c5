"""Device-neutral numerics: what Apple's MPS lacks must never run on the training device.

MPS has no float64 (pytorch/pytorch#122602: "Cannot convert a MPS Tensor to float64 dtype", closed as
a permanent limitation) and no complex128. CI has no Mac, so these tests run the code paths that
touch the training device on the CPU under a dispatch mode that fails any operation whose result
has such a dtype, except inside vqvae.host_math(): the blocks that work on .cpu() copies on purpose.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import study
import vqvae
from conftest import tiny_config

MPS_LACKS = (torch.float64, torch.complex128)


class RefuseWhatMPSLacks(TorchDispatchMode):
    """Raises on any operation outside vqvae.host_math() whose result is float64 or complex128."""

    def __init__(self):
        super().__init__()
        self.host_ops = 0  # operations that made such a tensor inside host_math (the check must see some)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        lacking = [t.dtype for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.dtype in MPS_LACKS]
        if lacking and not vqvae.HOST_MATH[0] > 0:
            raise AssertionError(f"{func} made a {lacking[0]} tensor on the training device, which MPS lacks; "
                                 f"do it on a .cpu() copy inside vqvae.host_math()")
        self.host_ops += bool(lacking)
        return out


def test_the_check_catches_float64_outside_host_math_and_allows_it_inside():
    with RefuseWhatMPSLacks() as check:
        with pytest.raises(AssertionError, match="float64"):
            torch.ones(3).double()
        with pytest.raises(AssertionError, match="float64"):
            torch.tensor(1.0, dtype=torch.float64)
        with vqvae.host_math():
            torch.ones(3).double().sum()
        torch.ones(3).sum()  # fp32 is fine anywhere
    assert check.host_ops >= 1


DEVICE_PATHS = [
    ("vq_ema", {"dead_code_threshold": 1.0}),
    ("vq_ema", {"grad_estimator": "rotation", "precision": "bf16"}),
    ("ba_vq", {"beta_units": "critical", "ba_prior": "running", "ba_codebook_update": "ema", "dead_code_threshold": 1.0,
               "ba_iters": 2, "ba_reseed_prior": "uniform"}),
    ("ba_vq", {"beta_units": "relative", "ba_eval": "batch", "ba_iters": 2, "ba_fast_path": False}),
    ("ba_vq", {"ba_output": "hard_ste", "ba_codebook_update": "grad_ema", "ba_grad_through_iters": True, "ba_iters": 2,
               "augment": "crop_flip", "pixel_range": "unit"}),
    ("fsq", {"fsq_levels": [4, 3, 2], "latent_norm": "l2"}),
]


@pytest.mark.parametrize("quantizer,extra", DEVICE_PATHS)
def test_training_validation_and_evaluation_make_nothing_mps_lacks(tmp_path, quantizer, extra):
    """A short training with validation every epoch, a resume, evaluation of the saved run (and, for BA,
    with the other evaluation rule and another β) and the study summary, all under the check."""
    cfg = tiny_config(tmp_path, quantizer=quantizer, epochs=2, max_steps=12, **extra)
    with RefuseWhatMPSLacks() as check:
        vqvae.train(vqvae.load_config(overrides={**vqvae.dataclasses.asdict(cfg), "max_steps": 6}))
        final = vqvae.train(cfg, resume=True)
        run = vqvae.run_dir_of(cfg)
        again = study.evaluate_saved(run)
        if quantizer == "ba_vq":
            study.evaluate_saved(run, beta=5.0, ba_eval="prior" if cfg.ba_eval == "batch" else "batch")
        rows = study.summarize(cfg.out_dir)
    assert check.host_ops > 0  # the metrics' float64 sums ran, on the host
    assert again["psnr"] == pytest.approx(final["psnr"]) and rows[0]["seeds"] == 1


def test_what_mps_cannot_do_is_refused_or_warned_before_any_work(tmp_path):
    mps, cpu = torch.device("mps"), torch.device("cpu")
    bf16 = tiny_config(tmp_path, precision="bf16")
    with pytest.raises(vqvae.VQVAEError, match="macOS 14"):
        vqvae.device_caveats(bf16, mps, "13.6.1")
    assert vqvae.device_caveats(bf16, mps, "14.5") == []
    assert vqvae.device_caveats(bf16, cpu, "") == []
    both = tiny_config(tmp_path, compile=True, deterministic=True)
    notes = vqvae.device_caveats(both, mps, "15.0")
    assert len(notes) == 2 and "compile" in notes[0] and "deterministic" in notes[1]
    assert vqvae.device_caveats(both, cpu, "") == []


def test_generators_for_mps_live_on_the_cpu_and_draw_the_same_as_a_cpu_run():
    cpu = vqvae.generator_for(torch.device("cpu"), 7)
    for_mps = vqvae.generator_for(torch.device("mps"), 7)
    assert for_mps.device.type == "cpu"
    assert torch.equal(torch.randperm(50, generator=cpu), torch.randperm(50, generator=for_mps))
