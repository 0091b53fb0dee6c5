"""Every fast path keeps the exact semantics of the plain computation it replaces."""
import copy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vqvae
from conftest import set_chunk_rows


def reference_e_step(z, codebook, log_q, beta, hard):
    """The last BA E-step written plainly: whole N×K matrices, autograd, and the hard output as
    z_q_soft + sg(c_idx − z_q_soft)."""
    d = ((z[:, None, :] - codebook[None, :, :]) ** 2).sum(-1)
    p = torch.softmax(log_q - beta * d, dim=1)
    z_q_soft, idx = p @ codebook, p.argmax(1)
    z_q = z_q_soft + (codebook[idx] - z_q_soft).detach() if hard else z_q_soft
    return z_q, p.mean(0), idx


@pytest.mark.parametrize("hard", [True, False])
@pytest.mark.parametrize("keep_p", [True, False])
@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 10_000])
def test_ba_e_step_chunked_equals_plain_autograd(monkeypatch, chunk_rows, keep_p, hard):
    torch.manual_seed(1)
    N, D, K, beta = 64, 5, 13, 1.7
    set_chunk_rows(monkeypatch, chunk_rows, K)
    monkeypatch.setattr(vqvae, "KEEP_ELEMENTS", N * K if keep_p else N * K - 1)
    z = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    codebook = torch.randn(K, D, dtype=torch.float64, requires_grad=True)
    log_q = torch.log_softmax(torch.randn(K, dtype=torch.float64), 0)
    g_zq, g_Q = torch.randn(N, D, dtype=torch.float64), torch.randn(K, dtype=torch.float64)

    z_q, Q, idx = reference_e_step(z, codebook, log_q, beta, hard)
    ((z_q * g_zq).sum() + (Q * g_Q).sum()).backward()
    ref_grads = z.grad.clone(), codebook.grad.clone()
    z.grad = codebook.grad = None

    z_q2, Q2, idx2, sums = vqvae.BAEStep.apply(z, codebook, log_q, beta, hard, True)
    ((z_q2 * g_zq).sum() + (Q2 * g_Q).sum()).backward()
    assert torch.allclose(z_q2, z_q, atol=1e-12) and torch.allclose(Q2, Q, atol=1e-12)
    assert torch.equal(idx2, idx)
    p = torch.softmax(log_q - beta * vqvae.squared_distances(z, codebook), dim=1).detach()
    assert torch.allclose(sums, p.t() @ z.detach(), atol=1e-10)
    if hard:
        assert torch.equal(z_q2, codebook[idx].detach())
    assert torch.allclose(z.grad, ref_grads[0], atol=1e-12)
    assert torch.allclose(codebook.grad, ref_grads[1], atol=1e-12)


@pytest.mark.parametrize("keep_p", [True, False])
@pytest.mark.parametrize("used", ["z_q", "Q"])
def test_ba_e_step_with_one_output_unused_equals_plain_autograd(monkeypatch, used, keep_p):
    """With only z_q or only Q reaching the loss (the other's gradient None, its matmuls skipped) the
    gradients are still those of plain autograd."""
    torch.manual_seed(2)
    N, D, K, beta = 40, 5, 11, 1.3
    set_chunk_rows(monkeypatch, 7, K)
    monkeypatch.setattr(vqvae, "KEEP_ELEMENTS", N * K if keep_p else N * K - 1)
    z = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    codebook = torch.randn(K, D, dtype=torch.float64, requires_grad=True)
    log_q = torch.log_softmax(torch.randn(K, dtype=torch.float64), 0).requires_grad_()
    weights = torch.randn(N, D, dtype=torch.float64) if used == "z_q" else torch.randn(K, dtype=torch.float64)
    grads = []
    for e_step in (lambda: reference_e_step(z, codebook, log_q, beta, False),
                   lambda: vqvae.BAEStep.apply(z, codebook, log_q, beta, False, True)):
        z_q, Q = e_step()[:2]
        ((z_q if used == "z_q" else Q) * weights).sum().backward()
        grads.append([t.grad.clone() for t in (z, codebook, log_q)])
        z.grad = codebook.grad = log_q.grad = None
    for want, got in zip(*grads):
        assert torch.allclose(got, want, atol=1e-10)


@pytest.mark.parametrize("hard", [True, False])
@pytest.mark.parametrize("chunk_rows", [1, 7, 10_000])
def test_ba_e_step_definition_equals_whole_matrix_autograd(monkeypatch, chunk_rows, hard):
    """vqvae.ba_e_step (the editable definition, chunked under checkpoint) against the whole-matrix
    computation above: values, codes, soft sums and every gradient, log Q's included."""
    torch.manual_seed(3)
    N, D, K, beta = 40, 5, 11, 0.9
    set_chunk_rows(monkeypatch, chunk_rows, K)
    z = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    codebook = torch.randn(K, D, dtype=torch.float64, requires_grad=True)
    log_q = torch.log_softmax(torch.randn(K, dtype=torch.float64), 0).requires_grad_()
    g_zq, g_Q = torch.randn(N, D, dtype=torch.float64), torch.randn(K, dtype=torch.float64)
    grads = []
    for step in (reference_e_step, vqvae.ba_e_step):
        z.grad = codebook.grad = log_q.grad = None
        z_q, Q, idx = step(z, codebook, log_q, beta, hard, True)[:3] if step is vqvae.ba_e_step else \
            step(z, codebook, log_q, beta, hard)
        ((z_q * g_zq).sum() + (Q * g_Q).sum()).backward()
        grads.append((z_q.detach(), Q.detach(), idx, z.grad.clone(), codebook.grad.clone(), log_q.grad.clone()))
    for a, b in zip(*grads):
        assert torch.allclose(a.double(), b.double(), atol=1e-12)
    sums = vqvae.ba_e_step(z, codebook, log_q, beta, hard, True)[3]
    p = torch.softmax(log_q - beta * vqvae.squared_distances(z, codebook), dim=1).detach()
    assert torch.allclose(sums, p.t() @ z.detach(), atol=1e-10)


@pytest.mark.parametrize("hard", [True, False])
@pytest.mark.parametrize("keep_p", [True, False])
def test_ba_fast_path_equals_the_definition(monkeypatch, hard, keep_p):
    """BAEStep (hand-derived backward) gives ba_e_step's values and gradients, log Q's included."""
    torch.manual_seed(4)
    N, D, K, beta = 64, 5, 13, 1.3
    set_chunk_rows(monkeypatch, 7, K)
    monkeypatch.setattr(vqvae, "KEEP_ELEMENTS", N * K if keep_p else 0)
    z = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    codebook = torch.randn(K, D, dtype=torch.float64, requires_grad=True)
    log_q = torch.log_softmax(torch.randn(K, dtype=torch.float64), 0).requires_grad_()
    g_zq, g_Q = torch.randn(N, D, dtype=torch.float64), torch.randn(K, dtype=torch.float64)
    results = []
    for step in (vqvae.ba_e_step, vqvae.BAEStep.apply):
        z.grad = codebook.grad = log_q.grad = None
        z_q, Q, idx, sums = step(z, codebook, log_q, beta, hard, True)
        ((z_q * g_zq).sum() + (Q * g_Q).sum()).backward()
        results.append((z_q.detach(), Q.detach(), idx, sums, z.grad.clone(), codebook.grad.clone(), log_q.grad.clone()))
    for a, b in zip(*results):
        assert torch.allclose(a.double(), b.double(), atol=1e-12)


def test_a_run_on_the_definition_matches_the_fast_path(tmp_path, monkeypatch):
    """ba_fast_path: false trains through ba_e_step and the log-domain iterations (an edit there takes
    effect) and, unedited, gives the fast path's run up to float rounding."""
    from conftest import tiny_config

    calls = []
    definition = vqvae.ba_e_step
    monkeypatch.setattr(vqvae, "ba_e_step", lambda *args: calls.append(1) or definition(*args))
    common = dict(quantizer="ba_vq", ba_iters=2, entropy_weight=0.1, max_steps=6)
    fast = vqvae.train(tiny_config(tmp_path, name="fast", **common))
    assert calls == []
    plain = vqvae.train(tiny_config(tmp_path, name="plain", ba_fast_path=False, **common))
    assert len(calls) == 6
    for key in ("psnr", "psnr_batch"):
        assert plain[key] == pytest.approx(fast[key], rel=1e-5), key
    for key in ("perplexity", "usage_rate"):  # histograms of 4,096 validation codes: one flipped by rounding moves them ~1e-3
        assert plain[key] == pytest.approx(fast[key], rel=1e-3), key


@pytest.mark.parametrize("keep_p", [True, False])
def test_ba_e_step_passes_gradcheck(monkeypatch, keep_p):
    set_chunk_rows(monkeypatch, 4, 4)
    monkeypatch.setattr(vqvae, "KEEP_ELEMENTS", 10**6 if keep_p else 0)
    torch.manual_seed(2)
    z = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    codebook = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    log_q = torch.log_softmax(torch.randn(4, dtype=torch.float64), 0)
    assert torch.autograd.gradcheck(lambda z, c: vqvae.BAEStep.apply(z, c, log_q, 0.8, False, False)[:2], (z, codebook))


@pytest.mark.parametrize("prior", ["uniform", "running"])
def test_ba_iterations_chunked_equal_whole(monkeypatch, prior):
    """ba_iters − 1 E/M iterations accumulated over row chunks in the log domain give the same
    prior, and so the same quantizer output and gradients, as one chunk."""
    torch.manual_seed(3)
    cfg = vqvae.load_config(overrides=dict(quantizer="ba_vq", codebook_size=24, latent_dim=4, ba_iters=4,
                                           ba_prior=prior, entropy_weight=0.1))
    q = vqvae.make_quantizer(cfg).train()
    q.beta = 2.5
    z_e = torch.randn(3, 4, 4, 4, requires_grad=True)

    def run(chunk_rows):
        set_chunk_rows(monkeypatch, chunk_rows, 24)
        q.zero_grad()
        z_e.grad = None
        z_q, losses, idx = q(z_e)
        (z_q.square().sum() + sum(losses.values())).backward()
        return z_q.detach(), idx, z_e.grad.clone(), q.codebook.grad.clone()

    state = copy.deepcopy(q.state_dict())  # the running prior moves on each forward
    whole = run(10_000)
    q.load_state_dict(state)
    chunked = run(5)
    assert torch.allclose(whole[0], chunked[0], atol=1e-5) and torch.equal(whole[1], chunked[1])
    assert torch.allclose(whole[2], chunked[2], atol=1e-6) and torch.allclose(whole[3], chunked[3], atol=1e-6)


def test_ba_iterations_match_a_plain_loop():
    """prior_after_iterations equals the textbook loop Q ← mean_n softmax(log Q − β d)."""
    torch.manual_seed(4)
    cfg = vqvae.load_config(overrides=dict(quantizer="ba_vq", codebook_size=10, latent_dim=3, ba_iters=6))
    q = vqvae.make_quantizer(cfg)
    q.beta = 0.9
    z, codebook = torch.randn(50, 3), torch.randn(10, 3)
    Q = torch.full((10,), 0.1)
    d = vqvae.squared_distances(z, codebook)
    for _ in range(5):
        Q = torch.softmax(Q.log() - 0.9 * d, dim=1).mean(0)
    assert torch.allclose(q.prior_after_iterations(z, codebook).exp(), Q, atol=1e-6)


@pytest.mark.parametrize("beta", [0.5, 5.0, 60.0])
def test_iterations_with_one_exp_equal_the_log_domain_ones(monkeypatch, beta):
    """The fast path's iterations (iteration_mass: linear-domain sums, one exp per logit) give the
    log-domain iterations' prior wherever a share is above e^−80, from a running prior with codes at
    the floor; below, the shares are nothing in either (a code whose p underflows in every row gets 0)."""
    torch.manual_seed(5)
    cfg = vqvae.load_config(overrides=dict(quantizer="ba_vq", codebook_size=64, latent_dim=6, ba_iters=4, ba_prior="running"))
    q = vqvae.make_quantizer(cfg)
    q.beta = beta
    q.prior.copy_(torch.softmax(3 * torch.randn(64), 0))
    q.prior[::4] = vqvae.PRIOR_FLOOR
    set_chunk_rows(monkeypatch, 37, 64)
    z, codebook = torch.randn(300, 6), torch.randn(64, 6)
    fast = q.prior_after_iterations(z, codebook)
    q.fast_path = False
    plain = q.prior_after_iterations(z, codebook)
    live = plain > -80
    assert live.sum() > 32
    assert torch.allclose(fast[live], plain[live], atol=1e-5, rtol=1e-5)
    assert (fast[~live] < -80).all()


def test_row_chunks_cover_every_row_once_and_grow_with_the_code_dimension():
    z64, z256 = torch.zeros(5000, 64), torch.zeros(5000, 256)
    for z in (z64, z256):
        chunks = vqvae.row_chunks(z, torch.zeros(16384, z.shape[1]))
        assert torch.equal(torch.cat([torch.arange(5000)[c] for c in chunks]), torch.arange(5000))
    size = lambda z: vqvae.row_chunks(z, torch.zeros(16384, z.shape[1]))[0].stop  # noqa: E731
    assert size(z256) == 4 * size(z64) == 4 * vqvae.CHUNK_ELEMENTS // 16384


def twin_models(cfg, **fast_overrides):
    """The model as configured and a copy with the fast path turned on, with the same weights."""
    plain = vqvae.build_model(cfg, torch.device("cpu"))
    fast = vqvae.build_model(vqvae.dataclasses.replace(cfg, **fast_overrides), torch.device("cpu"))
    fast.load_state_dict(plain.state_dict())  # same keys: the fast paths work in place
    return plain, fast


def assert_same_training_step(plain, fast, x_plain, x_fast):
    """Equal reconstructions, codes, and gradients at both ends of the model."""
    outputs = []
    for model, x in ((plain, x_plain), (fast, x_fast)):
        x_hat, losses, idx = model(x)
        sum(losses.values()).backward()
        outputs.append((x_hat.detach(), idx, model.encoder[0].weight.grad.clone(), model.decoder[-1].weight.grad.clone()))
    (x_hat, idx, g_first, g_last), (x_hat2, idx2, g_first2, g_last2) = outputs
    assert torch.allclose(x_hat, x_hat2, atol=1e-5) and torch.equal(idx, idx2)
    assert torch.allclose(g_first, g_first2, atol=1e-5) and torch.allclose(g_last, g_last2, atol=1e-5)


@pytest.mark.parametrize("quantizer", ["vq_ema", "ba_vq"])
def test_channels_last_equals_contiguous(quantizer):
    torch.manual_seed(5)
    cfg = vqvae.load_config(overrides=dict(quantizer=quantizer, codebook_size=16, n_hid=8, latent_dim=4,
                                           arch="resnet", channels_last=False))
    plain, fast = twin_models(cfg, channels_last=True)
    images = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8).numpy()
    x_u8 = vqvae.to_device_uint8(images, torch.device("cpu"))
    x_plain, x_fast = (vqvae.get_batch(x_u8, torch.arange(6), 0, 6, channels_last=layout) for layout in (False, True))
    assert x_plain.is_contiguous() and x_fast.is_contiguous(memory_format=torch.channels_last)
    assert_same_training_step(plain, fast, x_plain, x_fast)


def test_batched_kmeans_seeding_draws_distinct_data_points():
    torch.manual_seed(6)
    x = torch.randn(2000, 3)
    centers = vqvae.kmeans(x, 600, iters=0, generator=torch.Generator().manual_seed(0))
    assert centers.shape == (600, 3)
    assert len(torch.unique(centers, dim=0)) == 600
    # every centre is exactly one of the points
    assert (centers[:, None, :] == x[None, :, :]).all(-1).any(1).all()


def test_kmeans_lloyd_steps_do_not_increase_distortion():
    torch.manual_seed(7)
    x = torch.randn(3000, 4)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    costs = []
    for iters in (0, 1, 5):
        centers = vqvae.kmeans(x, 300, iters=iters, generator=gen())
        costs.append(vqvae.squared_distances(x, centers).min(1).values.mean().item())
    assert costs[0] >= costs[1] >= costs[2]


@pytest.mark.parametrize("K", [64, 512, 16384, 100])
def test_blockwise_argmax_equals_argmax_including_ties(K):
    torch.manual_seed(8)
    scores = torch.randint(0, 5, (300, K)).float()  # many ties: the first maximum must win
    scores[7] = 0.0                                # a row that is all ties
    assert torch.equal(vqvae.argmax_rows(scores), scores.argmax(1))
    scores = torch.randn(300, K)
    assert torch.equal(vqvae.argmax_rows(scores), scores.argmax(1))


@pytest.mark.parametrize("K", [64, 512, 16384, 100])
def test_blockwise_argmax_over_columns_equals_argmax_including_ties(K):
    torch.manual_seed(9)
    scores = torch.randint(0, 5, (K, 300)).float()  # codes first: the lowest code among equals must win
    scores[:, 7] = 0.0                              # a column that is all ties
    assert torch.equal(vqvae.argmax_columns(scores), scores.argmax(0))
    scores = torch.randn(K, 300)
    assert torch.equal(vqvae.argmax_columns(scores), scores.argmax(0))


def test_nearest_code_with_bias_over_many_chunks_equals_the_full_matrix(monkeypatch):
    set_chunk_rows(monkeypatch, 3, 128)  # many chunks
    z, codebook = torch.randn(1000, 8, dtype=torch.float64), torch.randn(128, 8, dtype=torch.float64)
    bias = torch.randn(128, dtype=torch.float64)
    expected = (bias - vqvae.squared_distances(z, codebook)).argmax(1)
    assert torch.equal(vqvae.nearest_code(z, codebook, bias), expected)


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
@pytest.mark.slow
def test_compiled_encoder_and_decoder_equal_eager():
    torch.manual_seed(9)
    cfg = vqvae.load_config(overrides=dict(quantizer="ba_vq", codebook_size=16, n_hid=8, latent_dim=4))
    plain, fast = twin_models(cfg, compile=True)
    x = (torch.rand(4, 3, 32, 32) * 2 - 1).contiguous(memory_format=torch.channels_last)
    assert_same_training_step(plain, fast, x, x)


def nearest_in_float64(z, codebook):
    """(N,) exact nearest codes and (N,) the gap between the nearest and the second nearest."""
    d = torch.cdist(z.double(), codebook.double()).pow(2)
    two = d.topk(2, dim=1, largest=False)
    return two.indices[:, 0], two.values[:, 1] - two.values[:, 0]


def screen_cases():
    """(name, z, codebook): a spread codebook, one fitted by k-means to the very points it is asked
    about (many codes nearly as close as the nearest: the screen's worst case), codes at many scales
    with dead ones at zero, and latents far from the origin."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4000, 64, generator=g)
    yield "random", z, torch.randn(2048, 64, generator=g)
    yield "kmeans", z, vqvae.kmeans(z, 2048, 3, g)
    scales = torch.logspace(-3, 1, 2048)[torch.randperm(2048, generator=g)]
    codebook = torch.randn(2048, 64, generator=g) * scales[:, None]
    codebook[::7] = 0.0
    yield "scales", 2 * z, codebook
    offset = 4 + torch.randn(64, generator=g)
    yield "offset", z + offset, torch.randn(2048, 64, generator=g) + offset


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16 screen", "fp32 screen"])
@pytest.mark.parametrize("rows", [32, 300, 5000])
def test_screened_nearest_code_is_the_exact_nearest_code(monkeypatch, rows, bf16):
    """Wherever float64 separates the nearest code from the next by more than fp32 rounding, the
    screen (in bf16 where it is native, else in fp32) returns it; elsewhere it returns a code as near
    as fp32 can tell."""
    monkeypatch.setattr(vqvae, "native_bf16_matmul", lambda: bf16)
    monkeypatch.setattr(vqvae, "SCREEN_CHUNK_ELEMENTS", rows * 2048)
    monkeypatch.setattr(vqvae, "MIN_CHUNK_ROWS", 1)
    for name, z, codebook in screen_cases():
        got = vqvae.nearest_code_screened(z, codebook)
        exact, gap = nearest_in_float64(z, codebook)
        scale = z.double().pow(2).sum(1) + codebook.double().pow(2).sum(1).max()
        clear = gap > 1e-5 * scale
        assert clear.float().mean() > 0.9, name  # the check below is not empty
        assert torch.equal(got[clear], exact[clear]), name
        d = torch.cdist(z.double(), codebook.double()).pow(2)
        assert (d.gather(1, got[:, None]).squeeze(1) - d.gather(1, exact[:, None]).squeeze(1) <= 1e-5 * scale).all(), name


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16 screen", "fp32 screen"])
def test_screened_nearest_code_breaks_ties_to_the_lowest_index(monkeypatch, bf16):
    monkeypatch.setattr(vqvae, "native_bf16_matmul", lambda: bf16)
    g = torch.Generator().manual_seed(4)
    codebook = torch.randn(2048, 16, generator=g)
    codebook[1500] = codebook[40]   # exact duplicates: argmax's first maximum wins
    codebook[1999] = codebook[40]
    z = codebook[[40, 1500, 1999, 7]] + 1e-3 * torch.randn(4, 16, generator=g)
    assert vqvae.nearest_code_screened(z, codebook).tolist() == [40, 40, 40, 7]


def test_screen_applies_only_where_it_is_exact_and_pays(monkeypatch):
    monkeypatch.setattr(vqvae, "native_bf16_matmul", lambda: True)
    z = torch.randn(10, 8)
    assert vqvae.screen_applies(z, torch.randn(2048, 8))
    assert not vqvae.screen_applies(z, torch.randn(1024, 8))          # below SCREEN_MIN_K
    assert not vqvae.screen_applies(z, torch.randn(2050, 8))          # not whole blocks of codes
    assert not vqvae.screen_applies(z.double(), torch.randn(2048, 8).double())
    monkeypatch.setattr(vqvae, "native_bf16_matmul", lambda: False)
    assert not vqvae.screen_applies(z, torch.randn(2048, 8))          # bf16 would be slow here
    assert vqvae.screen_applies(z, torch.randn(2048, 8), fp32_pays=True)  # BA's E-step: an fp32 screen
    monkeypatch.setattr(vqvae, "native_bf16_matmul", lambda: True)
    calls = []
    monkeypatch.setattr(vqvae, "nearest_code_screened", lambda z, c, bias=None: calls.append(bias) or torch.zeros(len(z), dtype=torch.long))
    vqvae.nearest_code(z, torch.randn(2048, 8))
    vqvae.nearest_code(z, torch.randn(2048, 8), bias=torch.zeros(2048))  # BA's prior bias: screened too
    vqvae.nearest_code(z, torch.randn(1024, 8), bias=torch.zeros(1024))
    assert len(calls) == 2 and calls[0] is None and torch.equal(calls[1], torch.zeros(2048))


def test_bf16_at_most_rounds_down():
    x = torch.randn(10_000) * torch.logspace(-5, 5, 10_000)
    down = vqvae.bf16_at_most(x)
    assert down.dtype == torch.bfloat16 and (down.float() <= x).all()
    up = torch.nextafter(down, torch.full_like(down, float("inf")))
    assert (up.float() > x).all()  # and it is the largest such value


@pytest.mark.parametrize("shape", [(300, 64, 512), (5, 256, 2048), (1, 3, 1)])
def test_mm_is_an_fp32_product_whichever_library_runs_it(shape):
    torch.manual_seed(10)
    M, K, N = shape
    a, b = torch.randn(M, K), torch.randn(K, N)
    exact = a.double() @ b.double()
    scale = a.abs().double() @ b.abs().double()  # Σ|terms|: fp32 summation error is a small multiple of K·u of it
    for left, right in ((a, b), (a.t().contiguous().t(), b), (a, b.t().contiguous().t())):  # strided operands too
        assert ((vqvae.mm(left, right).double() - exact).abs() <= 2 * K * 2**-24 * scale + 1e-30).all()


def test_mm_under_autograd_gives_gradients():
    a, b = torch.randn(4, 3, requires_grad=True), torch.randn(3, 5)
    vqvae.mm(a, b).sum().backward()
    assert torch.allclose(a.grad, b.sum(1).expand(4, 3))


def test_ba_e_step_gives_the_same_values_and_gradients_with_the_onednn_products_off(monkeypatch):
    torch.manual_seed(11)
    z, codebook = torch.randn(300, 16), torch.randn(128, 16)
    log_q, g = torch.log_softmax(torch.randn(128), 0), torch.randn(300, 16)

    def run():
        zz, cc = z.clone().requires_grad_(), codebook.clone().requires_grad_()
        z_q, Q, idx, sums = vqvae.BAEStep.apply(zz, cc, log_q, 0.7, False, True)
        ((z_q * g).sum() + (Q * Q.log()).sum()).backward()
        return z_q.detach(), Q.detach(), idx, sums, zz.grad, cc.grad

    on = run()
    monkeypatch.setattr(vqvae, "ONEDNN_MM", False)
    off = run()
    assert torch.equal(on[2], off[2])
    for a, b in zip(on[:2] + on[3:], off[:2] + off[3:]):  # fp32 sums in another order: within 10⁻⁵ of the scale
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


FAULTS_OF_REUSED_BLOCKS = """
import resource, sys
import torch
import vqvae
kept = vqvae.keep_freed_memory() if sys.argv[1] == "keep" else False
for _ in range(3):  # 48 MiB, above the 32 MiB to which glibc raises its own threshold; freed at once
    torch.ones(12 * 2**20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.ones(12 * 2**20)
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not vqvae.glibc_malloc(), reason="glibc's malloc only")
def test_freed_blocks_are_reused_without_page_faults_once_kept():
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", FAULTS_OF_REUSED_BLOCKS, mode], capture_output=True, text=True,
                             check=True, cwd=Path(vqvae.__file__).parent).stdout.split()
        return out[0] == "True", int(out[1])

    pages = 10 * 48 * 2**20 // 4096            # of the ten blocks
    kept, kept_faults = faults("keep")
    assert kept and kept_faults < pages / 4     # freed blocks are the next ones (once in a while one more block)
    assert faults("default")[1] > pages / 2     # glibc alone hands each one back and faults it in anew
