import math

import pytest
import torch

import vqvae


def test_perplexity_of_uniform_histogram_is_K():
    assert vqvae.perplexity(torch.full((64,), 7)) == pytest.approx(64)


def test_perplexity_of_one_code_is_one():
    counts = torch.zeros(64, dtype=torch.long)
    counts[5] = 100
    assert vqvae.perplexity(counts) == pytest.approx(1.0)


def test_perplexity_two_codes_hand_computed():
    # p = (0.25, 0.75): H = -(0.25 ln 0.25 + 0.75 ln 0.75)
    counts = torch.tensor([1, 3, 0, 0])
    expected = math.exp(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    assert vqvae.perplexity(counts) == pytest.approx(expected)


def test_usage_and_dead_codes():
    counts = torch.tensor([0, 2, 0, 5, 1, 0, 0, 0])
    m = vqvae.codebook_metrics(counts)
    assert m["usage_rate"] == pytest.approx(3 / 8)
    assert m["dead_codes"] == 5


def test_code_histogram_counts_every_index():
    idx = torch.tensor([[0, 1], [1, 3]])
    assert vqvae.code_histogram(idx, 5).tolist() == [1, 2, 0, 1, 0]


def test_psnr_minus_legacy_is_20_log10_2():
    m = vqvae.reconstruction_metrics(sse_pm1=123.4, n_values=1000)
    assert m["psnr"] - m["psnr_legacy"] == pytest.approx(20 * math.log10(2))


def test_reconstruction_metrics_in_pixel_space():
    # every [-1, 1] value off by 0.2 → off by 0.1 in [0, 1] → mse 0.01 → psnr 20 dB
    x = torch.zeros(2, 3, 4, 4)
    m = vqvae.reconstruction_metrics(((x + 0.2) - x).pow(2).sum().item(), x.numel())
    assert m["mse"] == pytest.approx(0.01)
    assert m["psnr"] == pytest.approx(20.0)


def test_evaluate_is_dataset_level_not_batch_average():
    """Codebook metrics come from one histogram over all validation codes: the result must not
    depend on the evaluation batch size."""
    cfg = vqvae.load_config(overrides=dict(n_hid=8, latent_dim=4, codebook_size=16))
    model = vqvae.VQVAE(cfg)
    x = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    a = vqvae.evaluate(model, x, batch_size=7)
    b = vqvae.evaluate(model, x, batch_size=40)
    assert a["perplexity"] == pytest.approx(b["perplexity"])
    assert a["usage_rate"] == b["usage_rate"]
    assert a["psnr"] == pytest.approx(b["psnr"], rel=1e-5)


def test_batch_average_metrics_two_batches_hand_computed():
    """The published convention averages per-batch values. Batch 1: [0, 1]-pixel MSE 0.01 (20 dB),
    codes {0, 0, 1, 1} → perplexity 2, usage 2/4. Batch 2: MSE 0.001 (30 dB), codes {0, 1, 2, 3} →
    perplexity 4, usage 1. Means: 25 dB, 3, 0.75 — while the pooled MSE 0.0055 gives 22.60 dB."""
    values = 100                                      # values per batch
    sse_pm1 = torch.tensor([0.01 * 4 * values, 0.001 * 4 * values])  # [−1, 1] error is 4× the [0, 1] one
    counts = torch.tensor([[2, 2, 0, 0], [1, 1, 1, 1]])
    m = vqvae.batch_average_metrics(sse_pm1, counts, values)
    n = m["batches"].item()
    assert n == 2
    assert m["psnr_batch"].item() / n == pytest.approx(25.0)
    assert m["perplexity_batch"].item() / n == pytest.approx(3.0)
    assert m["usage_batch"].item() / n == pytest.approx(0.75)
    pooled = vqvae.reconstruction_metrics(sse_pm1.sum().item(), 2 * values)["psnr"]
    assert pooled == pytest.approx(10 * math.log10(1 / 0.0055))


def test_psnr_of_a_perfect_reconstruction_is_inf():
    assert vqvae.psnr(0.0) == math.inf


def test_evaluate_batch_metrics_are_means_over_full_batches():
    """psnr_batch / perplexity_batch / usage_batch equal the per-batch values computed by hand from
    the model's own eval output, over the full batches only (40 images in batches of 16: two)."""
    torch.manual_seed(0)
    cfg = vqvae.load_config(overrides=dict(n_hid=8, latent_dim=4, codebook_size=16))
    model = vqvae.VQVAE(cfg).eval()
    x_u8 = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    got = vqvae.evaluate(model, x_u8, batch_size=16)
    psnrs, ppls, usages = [], [], []
    with torch.no_grad():
        for start in (0, 16):
            x = vqvae.normalize(x_u8[start:start + 16])
            x_hat, _, idx = model(x)
            mse01 = ((x_hat - x) / 2).pow(2).mean().item()
            psnrs.append(-10 * math.log10(mse01))
            counts = torch.bincount(idx.flatten(), minlength=16)
            ppls.append(vqvae.perplexity(counts))
            usages.append((counts > 0).float().mean().item())
    assert got["psnr_batch"] == pytest.approx(sum(psnrs) / 2, rel=1e-5)
    assert got["perplexity_batch"] == pytest.approx(sum(ppls) / 2, rel=1e-9)
    assert got["usage_batch"] == pytest.approx(sum(usages) / 2)
    assert got["perplexity_batch"] != pytest.approx(got["perplexity"])  # dataset-level differs


# --- rate: what an entropy coder fitted on the training codes would spend --------------------


def test_rate_of_uniform_codes_is_log2_K():
    K = 64
    rate = vqvae.rate_metrics(torch.full((K,), 1000), torch.full((K,), 10), latents_per_image=64)
    assert rate["bits_per_index"] == pytest.approx(math.log2(K))
    assert rate["entropy_bits"] == pytest.approx(math.log2(K))
    assert rate["bits_per_pixel"] == pytest.approx(math.log2(K) * 64 / 1024)


def test_a_code_unseen_in_training_costs_what_add_one_smoothing_says():
    """train: 6 of code 0, 2 of code 1, none of codes 2 and 3 (n = 8, K = 4): Q = (7, 3, 1, 1) / 12.
    Validation: one index of code 0 and one of code 2 → (log2(12/7) + log2(12/1)) / 2 bits."""
    train, val = torch.tensor([6, 2, 0, 0]), torch.tensor([1, 0, 1, 0])
    rate = vqvae.rate_metrics(train, val, latents_per_image=64)
    assert rate["bits_per_index"] == pytest.approx((math.log2(12 / 7) + math.log2(12)) / 2)
    assert rate["entropy_bits"] == pytest.approx(1.0)                      # two codes, equally used
    # the cross-entropy under a training marginal is never below the validation entropy (Gibbs)
    assert rate["bits_per_index"] >= rate["entropy_bits"]


def test_a_run_reports_its_rate_from_the_training_codes_of_its_final_model(tmp_path):
    from conftest import tiny_config
    cfg = tiny_config(tmp_path, max_steps=2)
    final = vqvae.train(cfg)
    model = vqvae.load_model(vqvae.run_dir_of(cfg) / "final_model.pt")
    train, test = vqvae.load_dataset(cfg)
    import study
    counts = study.read_code_counts(vqvae.run_dir_of(cfg))
    train_counts = []
    vqvae.evaluate(model, vqvae.to_device_uint8(train, torch.device("cpu")), 40, counts_out=train_counts)
    assert train_counts[0].sum() == len(train) * 64                           # every training latent once
    assert final["bits_per_index"] == pytest.approx(vqvae.rate_metrics(train_counts[0], counts, 64)["bits_per_index"])
    assert [r for r in study.read_history(vqvae.run_dir_of(cfg)) if r["split"] == "final"][0]["bits_per_pixel"] == \
        pytest.approx(final["bits_per_pixel"])
