"""The published study's recipe as options: augmentation, the study's model, its BA layer."""
import pytest
import torch
import torch.nn.functional as F

import study
import vqvae
from conftest import tiny_config


def crop_flip_by_hand(x, dy, dx, flip, pad=4):
    """One image (C, H, W): reflect-pad, crop at (dy, dx), flip left–right if asked."""
    H, W = x.shape[1:]
    out = F.pad(x[None], (pad,) * 4, mode="reflect")[0, :, dy:dy + H, dx:dx + W]
    return out.flip(2) if flip else out


def all_crops(x, pad=4):
    return [crop_flip_by_hand(x, dy, dx, f) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1) for f in (0, 1)]


def test_crop_flip_gives_a_crop_of_each_reflect_padded_image():
    x = torch.randn(6, 3, 32, 32)
    y = vqvae.augment_crop_flip(x, torch.Generator().manual_seed(3))
    assert y.shape == x.shape
    for b in range(6):
        assert any(torch.equal(y[b], c) for c in all_crops(x[b]))


def test_crop_flip_centre_crop_with_flip_is_the_mirror_image():
    """Offsets (4, 4) undo the padding: the image itself, or its mirror image when flipped."""
    x = torch.randn(3, 8, 8)
    assert torch.equal(crop_flip_by_hand(x, 4, 4, False), x)
    assert torch.equal(crop_flip_by_hand(x, 4, 4, True), x.flip(2))


def test_crop_flip_uses_every_offset_and_both_flips():
    x = torch.arange(32 * 32, dtype=torch.float32).view(1, 1, 32, 32).expand(2000, 1, 32, 32).contiguous()
    y = vqvae.augment_crop_flip(x, torch.Generator().manual_seed(0))
    # pixel (0, 0) of a crop is padded pixel (dy, dx) (or (dy, dx + 31) when flipped): all 81·2 kinds appear
    kinds = {(tuple(y[b, 0, 0, :2].tolist()), y[b, 0, 1, 0].item()) for b in range(2000)}
    assert len(kinds) == 81 * 2


def test_crop_flip_is_deterministic_under_the_seed_and_differs_across_seeds():
    x = torch.randn(16, 3, 32, 32)
    a, b, c = (vqvae.augment_crop_flip(x, torch.Generator().manual_seed(s)) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_crop_flip_shards_are_the_global_batch_split():
    """Data-parallel: each process augments its share exactly as one process augments the whole batch."""
    x = torch.randn(8, 3, 32, 32)
    whole = vqvae.augment_crop_flip(x, torch.Generator().manual_seed(5))
    parts = [vqvae.augment_crop_flip(x[r * 4:(r + 1) * 4], torch.Generator().manual_seed(5), (r, 2)) for r in (0, 1)]
    assert torch.equal(torch.cat(parts), whole)


def test_crop_flip_keeps_the_memory_layout():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    assert vqvae.augment_crop_flip(x, g).is_contiguous()
    assert vqvae.augment_crop_flip(x.to(memory_format=torch.channels_last), g).is_contiguous(
        memory_format=torch.channels_last)


def test_augmented_training_is_deterministic_and_differs_from_plain(tmp_path):
    a = vqvae.train(tiny_config(tmp_path, name="a", augment="crop_flip"))
    b = vqvae.train(tiny_config(tmp_path, name="b", augment="crop_flip"))
    plain = vqvae.train(tiny_config(tmp_path, name="plain"))
    assert a["psnr"] == b["psnr"] and a["perplexity"] == b["perplexity"]
    assert a["psnr"] != plain["psnr"]


# --- the published BA layer ------------------------------------------------------------------

def ba(**overrides):
    cfg = vqvae.load_config(overrides=dict(quantizer="ba_vq", codebook_size=16, latent_dim=4, ba_iters=3,
                                           ba_prior="running", beta_start=1.5) | overrides)
    q = vqvae.make_quantizer(cfg)
    with torch.no_grad():
        q.codebook.normal_()
        q.prior.copy_(torch.softmax(torch.randn(16), 0))   # a non-uniform running prior
    return q


def squared_distances_by_hand(z, c):
    return ((z[:, None, :] - c[None, :, :]) ** 2).sum(-1)   # (N, K)


def published_codes_by_hand(z, c, prior, beta, iters):
    """The published evaluation rule: from Q = π, iters − 1 rounds of E (p ∝ Q·exp(−β·d)) and M
    (Q = batch mean of p); the code is the argmax of the last E-step."""
    d = squared_distances_by_hand(z, c)
    q = prior
    for _ in range(iters - 1):
        q = torch.softmax(q.log() - beta * d, 1).mean(0)
    return (q.log() - beta * d).argmax(1)


@pytest.mark.parametrize("iters", [1, 2, 4])
def test_ba_eval_batch_rule_equals_its_definition(iters):
    q = ba(ba_eval="batch", ba_iters=iters).eval()
    z_e = torch.randn(3, 4, 2, 2)
    _, _, idx = q(z_e)
    z = vqvae.flatten_latents(z_e)
    expected = published_codes_by_hand(z.double(), q.codebook.double(), q.prior.double(), q.beta, iters)
    assert torch.equal(idx.flatten(), expected)


def test_ba_eval_batch_with_one_iteration_is_the_prior_rule_and_depends_on_the_batch_otherwise():
    z_e = torch.randn(4, 4, 2, 2) * 0.3
    torch.manual_seed(0)
    prior_rule = ba(ba_eval="prior", ba_iters=1).eval()(z_e)[2]
    torch.manual_seed(0)
    assert torch.equal(ba(ba_eval="batch", ba_iters=1).eval()(z_e)[2], prior_rule)
    # two near codes on the first axis (the others far away); an image whose latents sit at 0.45 is
    # nearer code 0, but beside images at 1.0 the batch marginal favours code 1 enough to flip it
    q = ba(ba_eval="batch", ba_iters=3, beta_start=1.0, ba_prior="uniform").eval()
    with torch.no_grad():
        q.codebook.copy_(torch.arange(16.0)[:, None] * 50 + torch.zeros(16, 4))
        q.codebook[1] = torch.tensor([1.0, 0, 0, 0])
    image = torch.zeros(1, 4, 2, 2)
    image[:, 0] = 0.45
    others = torch.zeros(7, 4, 2, 2)
    others[:, 0] = 1.0
    assert q(image)[2].unique().tolist() == [0]
    assert q(torch.cat([image, others]))[2][0].unique().tolist() == [1]


def test_ba_grad_ema_codebook_is_gradient_plus_centroid_step():
    """grad_ema: the codebook is still a trained parameter (its gradient is the one the grad mode
    computes at the same values), and each training forward moves it by
    c ← d·c + (1 − d)·Σp·e / max(Σp, 1e-6)."""
    torch.manual_seed(1)
    both, grad_only = ba(ba_codebook_update="grad_ema", ema_decay=0.9), ba(ba_codebook_update="grad")
    grad_only.load_state_dict(both.state_dict())
    z_e = torch.randn(2, 4, 3, 3)
    z = vqvae.flatten_latents(z_e)
    before = both.codebook.detach().clone()
    p = study.ba_probabilities(both, z, before)                                               # (N, K)
    centroids = (p.t() @ z) / p.sum(0).clamp_min(1e-6)[:, None]
    w = torch.randn(2, 4, 3, 3)
    for q in (both, grad_only):
        (q(z_e)[0] * w).sum().backward()
    torch.testing.assert_close(both.codebook.detach(), 0.9 * before + 0.1 * centroids, rtol=1e-5, atol=1e-6)
    assert both.codebook.requires_grad
    torch.testing.assert_close(both.codebook.grad, grad_only.codebook.grad)
    assert torch.equal(grad_only.codebook.detach(), before)                          # grad mode: moved by the optimizer only


def test_ba_codes_without_mass_decay_toward_zero_under_grad_ema():
    q = ba(ba_codebook_update="grad_ema", ema_decay=0.5)
    with torch.no_grad():
        q.codebook[0] = 1e4            # far from every latent: p(0|e) underflows to 0
    q(torch.randn(2, 4, 3, 3))
    torch.testing.assert_close(q.codebook[0].detach(), torch.full((4,), 0.5e4))


def ba_forward_by_hand(z, c, prior, beta, iters):
    """The published BA forward in plain autograd, unchunked: gradient through every iteration,
    hard output with the soft output's gradient."""
    d = squared_distances_by_hand(z, c)
    log_q = prior.log()
    for _ in range(iters - 1):
        log_q = torch.softmax(log_q - beta * d, 1).mean(0).log()
    p = torch.softmax(log_q - beta * d, 1)
    soft = p @ c
    return soft + (c[p.argmax(1)] - soft).detach()


@pytest.mark.parametrize("chunk_rows", [None, 5])
def test_ba_gradient_through_every_iteration_equals_plain_autograd(monkeypatch, chunk_rows):
    if chunk_rows:
        monkeypatch.setattr(vqvae, "CHUNK_ELEMENTS", chunk_rows * 16)
        monkeypatch.setattr(vqvae, "MIN_CHUNK_ROWS", 1)
        monkeypatch.setattr(vqvae, "KEEP_ELEMENTS", 0)        # recompute p in backward too
    q = ba(ba_grad_through_iters=True, ba_iters=3, beta_start=0.7)
    z_e = torch.randn(2, 4, 3, 3, dtype=torch.float32, requires_grad=True)
    w = torch.randn(2, 4, 3, 3)
    prior = q.prior.clone()                                   # the forward moves the running prior
    (q(z_e)[0] * w).sum().backward()
    z_ref = vqvae.flatten_latents(z_e.detach()).double().requires_grad_()
    c_ref = q.codebook.detach().double().requires_grad_()
    out = ba_forward_by_hand(z_ref, c_ref, prior.double(), q.beta, 3)
    (out * vqvae.flatten_latents(w).double()).sum().backward()
    torch.testing.assert_close(vqvae.flatten_latents(z_e.grad).double(), z_ref.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(q.codebook.grad.double(), c_ref.grad, rtol=1e-4, atol=1e-6)


def test_ba_gradient_through_iterations_is_a_different_estimator():
    z_e = torch.randn(2, 4, 3, 3, requires_grad=True)
    grads = []
    for through in (True, False):
        torch.manual_seed(0)
        q = ba(ba_grad_through_iters=through, beta_start=0.7)
        z_e.grad = None
        q(z_e)[0].pow(2).sum().backward()
        grads.append(z_e.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


def test_running_prior_is_floored_so_a_starved_code_can_return():
    q = ba()
    with torch.no_grad():
        q.prior.zero_()
        q.prior[0] = 1.0
    log_q = q.log_prior()
    assert torch.isfinite(log_q).all() and log_q[1].item() == pytest.approx(torch.tensor(1e-20).log().item())


# --- data range, k-means source, the model ---------------------------------------------------

class ShiftModel(torch.nn.Module):
    """Reconstructs every pixel 0.1 of the [0, 1] range too high, whatever its own range."""

    def __init__(self, pixel_range):
        super().__init__()
        self.pixel_range = pixel_range
        self.quantizer = type("Q", (), {"codebook_size": 4})()

    def forward(self, x):
        shift = 0.1 if self.pixel_range == "unit" else 0.2
        return x + shift, {}, torch.zeros(x.shape[0], 8, 8, dtype=torch.long)


@pytest.mark.parametrize("pixel_range", ["signed", "unit"])
def test_metrics_are_in_unit_pixels_whatever_the_model_range(pixel_range):
    x = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    m = vqvae.evaluate(ShiftModel(pixel_range), x, batch_size=8)
    assert m["mse"] == pytest.approx(0.01) and m["psnr"] == pytest.approx(20.0)
    assert m["psnr_batch"] == pytest.approx(20.0) and m["psnr_legacy"] == pytest.approx(20.0 - 6.0206, abs=1e-3)


def test_normalize_ranges():
    x = torch.tensor([0, 255], dtype=torch.uint8)
    assert vqvae.normalize(x, "unit").tolist() == [0.0, 1.0]
    assert vqvae.normalize(x, "signed").tolist() == [-1.0, 1.0]


def test_kmeans_val_seeds_the_codebook_from_the_first_validation_batch_only():
    cfg = vqvae.load_config(overrides=dict(codebook_init="kmeans_val", codebook_size=8, n_hid=8, latent_dim=4,
                                           batch_size=4))
    x_val = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    codebooks = []
    for x_train, val in [(torch.zeros(6, 3, 32, 32, dtype=torch.uint8), x_val),
                         (torch.full((6, 3, 32, 32), 200, dtype=torch.uint8), x_val),
                         (torch.zeros(6, 3, 32, 32, dtype=torch.uint8), torch.cat([x_val[:4], x_val[4:].flip(0)])),
                         (torch.zeros(6, 3, 32, 32, dtype=torch.uint8), x_val.flip(0))]:
        torch.manual_seed(0)
        model = vqvae.VQVAE(cfg)
        vqvae.init_codebook_from_data(model, x_train, cfg, torch.Generator().manual_seed(1), val)
        codebooks.append(model.quantizer.codebook.detach().clone())
    # 4 images × 64 latents ≥ 4·K: only the first validation batch is read
    assert torch.equal(codebooks[0], codebooks[1]) and torch.equal(codebooks[0], codebooks[2])
    assert not torch.equal(codebooks[0], codebooks[3])


def test_sonnet_model_shapes_and_size():
    cfg = vqvae.load_config(overrides=dict(arch="sonnet"))
    model = vqvae.VQVAE(cfg)
    z_e = model.encoder(torch.zeros(2, 3, 32, 32))
    assert z_e.shape == (2, 64, 8, 8) and model.decoder(z_e).shape == (2, 3, 32, 32)

    def conv(i, o, k):
        return i * o * k * k + o
    block = conv(128, 32, 3) + conv(32, 128, 1)
    encoder = conv(3, 64, 4) + conv(64, 128, 4) + conv(128, 128, 3) + 2 * block + conv(128, 64, 1)
    decoder = conv(64, 64, 1) + conv(64, 128, 3) + 2 * block + conv(128, 64, 4) + conv(64, 3, 4)
    assert sum(p.numel() for p in model.encoder.parameters()) == encoder
    assert sum(p.numel() for p in model.decoder.parameters()) == decoder
    assert encoder + decoder == 666_883   # the published code's ≈667k
