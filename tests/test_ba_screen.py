"""The screened BA E-step: an accelerator of ba_logits that computes p(k|e) over each row's candidates
only. It must find every code that matters, drop at most BA_SCREEN_TOL of a row's mass, give the
dense path's values and gradients to its own rounding, and step aside where the sets are large."""
import functools
import math

import pytest
import torch

import vqvae
from conftest import tiny_config

K, D, N = 2048, 16, 1500


@pytest.fixture(autouse=True, params=[True, False], ids=["bf16 screen", "fp32 screen"])
def native_bf16(monkeypatch, request):
    """Every test with the screen in bf16 (where bf16 dot products are native; bf16 matmuls give the same
    values on any CPU) and in fp32 (elsewhere)."""
    monkeypatch.setattr(vqvae, "native_bf16_matmul", lambda: request.param)
    return request.param


@functools.cache
def cases():
    """(name, z, codebook, log_q), made once: a spread codebook, one fitted by k-means to the latents it is asked
    about, one that collapsed onto a few points (most codes indistinguishable) with a live remainder,
    and a running prior with a fifth of the codes at the floor and a few at −inf."""
    g = torch.Generator().manual_seed(11)
    z = torch.randn(N, D, generator=g)
    uniform = torch.full((K,), -math.log(K))
    out = [("spread", z, torch.randn(K, D, generator=g), uniform)]
    fitted = vqvae.kmeans(torch.cat([z, torch.randn(K, D, generator=g)]), K, 3, g)
    out.append(("kmeans", z, fitted, uniform))
    collapsed = torch.randn(K, D, generator=g)
    collapsed[: K * 3 // 4] = torch.randn(4, D, generator=g).repeat(K * 3 // 16, 1) + 1e-4 * torch.randn(K * 3 // 4, D, generator=g)
    out.append(("collapsed", z, collapsed, uniform))
    prior = torch.softmax(2 * torch.randn(K, generator=g), 0).clamp_min(vqvae.PRIOR_FLOOR)
    prior[::5] = vqvae.PRIOR_FLOOR
    log_q = prior.log()
    log_q[7::101] = -math.inf  # codes an M-step left with no mass
    out.append(("running prior", z, fitted, log_q))
    return out


def case_named(case):
    """The (name, z, codebook, log_q) of cases() called `case`."""
    return next(c for c in cases() if c[0] == case)


def e_step(z, codebook, log_q, beta, hard, screen_on, dtype=torch.float32, used=("z_q", "Q")):
    """BAEStep's outputs and the gradients of a fixed random loss of z_q and Q (or only the `used` one), as float64."""
    z, codebook, log_q = (t.to(dtype).detach().requires_grad_() for t in (z, codebook, log_q))
    tol = vqvae.BA_SCREEN_TOL
    vqvae.BA_SCREEN_TOL = tol if screen_on else 0.0
    try:
        z_q, Q, idx, sums = vqvae.BAEStep.apply(z, codebook, log_q, beta, hard, True)
    finally:
        vqvae.BA_SCREEN_TOL = tol
    g = torch.Generator().manual_seed(5)
    w_zq, w_q = torch.randn(z_q.shape, generator=g), torch.randn(Q.shape, generator=g)
    terms = {"z_q": (z_q * w_zq.to(dtype)).sum(), "Q": (Q * w_q.to(dtype)).sum()}
    sum(terms[name] for name in used).backward()  # an output left out gets no gradient (None in BAEStep)
    values = {"z_q": z_q, "Q": Q, "sums": sums, "grad z": z.grad, "grad codebook": codebook.grad, "grad log Q": log_q.grad}
    return {name: v.detach().double().nan_to_num(neginf=0.0) for name, v in values.items()}, idx


def logits64(z, codebook, log_q, beta):
    return vqvae.ba_logits(z.double(), codebook.double(), log_q.double(), beta)


@pytest.mark.parametrize("beta", [10.0, 300.0])
@pytest.mark.parametrize("case", ["spread", "kmeans", "collapsed", "running prior"])
def test_screen_keeps_every_code_within_the_margin_and_drops_at_most_the_tolerance(case, beta):
    name, z, codebook, log_q = case_named(case)
    parts = vqvae.ba_screened_logits(z, codebook, log_q, beta, codebook.pow(2).sum(1))
    if parts is None:  # the sets were too large: nothing to check but that the dense path ran
        assert case == "collapsed" or beta == 10.0
        return
    exact = logits64(z, codebook, log_q, beta)                                    # (N, K)
    chosen = torch.zeros(N, K, dtype=torch.bool)
    for rows, r, k, logits in parts:
        chosen[rows][r, k] = True
        shift = (exact[rows][r, k] - logits.double())                              # the same up to a row constant
        assert torch.allclose(shift, (z[rows][r].double().pow(2).sum(1) * beta), rtol=1e-5), name
    T = math.log(K / vqvae.BA_SCREEN_TOL)
    fuzz = 1e-5 * beta * (z.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1).max()).double()  # fp32 rounding
    must = exact >= exact.max(1, keepdim=True).values - T + fuzz
    assert chosen[must].all(), name
    dropped = torch.softmax(exact, 1).masked_fill(chosen, 0).sum(1)
    assert dropped.max() <= vqvae.BA_SCREEN_TOL, name
    assert chosen.sum() < N * K * vqvae.BA_SCREEN_MAX_SHARE


MATRIX = [(case, beta, hard, ("z_q", "Q")) for case in ("spread", "kmeans", "collapsed", "running prior")
          for beta in (3.0, 30.0, 300.0) for hard in (True, False)]
ONE_OUTPUT = [(case, 30.0, False, used) for case in ("kmeans", "running prior") for used in (("z_q",), ("Q",))]


@functools.cache
def dense_e_steps(case, beta, hard, used):
    """The dense E-step in float64 and in fp32, made once for both screen precisions (neither screens)."""
    _, z, codebook, log_q = case_named(case)
    return (e_step(z, codebook, log_q, beta, hard, screen_on=False, dtype=torch.float64, used=used),
            e_step(z, codebook, log_q, beta, hard, screen_on=False, used=used))


@pytest.mark.parametrize("case, beta, hard, used", MATRIX + ONE_OUTPUT)
def test_screened_e_step_matches_the_dense_one_to_its_rounding(case, beta, hard, used):
    """Against float64 (dense), the screened fp32 values and gradients are as close as the dense fp32
    ones, within the spread of rounding (five times their error, a floor of 1e-6 of each quantity's
    scale) and what the dropped mass may move; a code the screen missed or a wrong sparse sum errs by
    the scale itself."""
    name, z, codebook, log_q = case_named(case)
    (truth, idx64), (dense, idx_dense) = dense_e_steps(case, beta, hard, used)
    screened, idx_screened = e_step(z, codebook, log_q, beta, hard, screen_on=True, used=used)
    for key, want in truth.items():
        scale = want.abs().max().item()
        dropped = vqvae.BA_SCREEN_TOL * (1.0 if key == "Q" else scale)          # what the dropped mass may move
        allowed = 5 * (dense[key] - want).abs().max().item() + dropped + 1e-6 * scale + 1e-12
        assert (screened[key] - want).abs().max().item() <= allowed, (name, key)
    exact = logits64(z, codebook, log_q, beta)
    top2 = exact.topk(2, dim=1).values
    clear = top2[:, 0] - top2[:, 1] > 1e-4 * beta * D                            # no near-tie for the argmax
    assert torch.equal(idx_screened[clear], idx64[clear]) and torch.equal(idx_dense[clear], idx64[clear])


def test_the_screen_steps_aside_where_the_sets_are_large_or_it_is_switched_off(monkeypatch):
    _, z, codebook, log_q = case_named("kmeans")
    c2 = codebook.pow(2).sum(1)
    assert vqvae.ba_screened_logits(z, codebook, log_q, 0.01, c2) is None       # early, small β: every code counts
    assert vqvae.ba_screened_logits(z, codebook, log_q, 300.0, c2) is not None
    assert vqvae.ba_screened_logits(z, codebook[:1024], log_q[:1024], 300.0, c2[:1024]) is None  # below SCREEN_MIN_K
    monkeypatch.setattr(vqvae, "BA_SCREEN_TOL", 0.0)
    assert vqvae.ba_screened_logits(z, codebook, log_q, 300.0, c2) is None
    monkeypatch.setattr(vqvae, "BA_SCREEN_TOL", 1e-7)
    assert vqvae.ba_screened_logits(z.double(), codebook.double(), log_q.double(), 300.0, c2.double()) is None


def test_a_crowded_chunk_in_a_sparse_batch_stays_sparse(monkeypatch):
    """The dense fallback is decided on the candidates of the batch so far, not chunk by chunk: 300 latents
    on codes of their own (one candidate each) then 100 on a cluster of 16 codes (16 each) stay sparse,
    although their chunk alone is over the share; the crowded rows first send the batch dense at once."""
    monkeypatch.setattr(vqvae, "SCREEN_CHUNK_ELEMENTS", 100 * K)                     # chunks of 100 rows
    g = torch.Generator().manual_seed(3)
    codebook = 3 * torch.randn(K, D, generator=g)
    centre = 3 * torch.randn(D, generator=g)
    codebook[:16] = centre + 1e-3 * torch.randn(16, D, generator=g)
    z = torch.cat([codebook[16:316], centre.repeat(100, 1)])
    log_q, c2, share = torch.full((K,), -math.log(K)), codebook.pow(2).sum(1), vqvae.BA_SCREEN_MAX_SHARE
    parts = vqvae.ba_screened_logits(z, codebook, log_q, 300.0, c2)
    assert parts is not None and [p[0].start for p in parts] == [0, 100, 200, 300]
    assert [p[1].numel() for p in parts] == [100, 100, 100, 1600]
    assert parts[-1][1].numel() > share * 100 * K                                   # the last chunk alone: dense
    assert sum(p[1].numel() for p in parts) < share * 400 * K                        # the batch: sparse
    assert vqvae.ba_screened_logits(z.flip(0), codebook, log_q, 300.0, c2) is None


def test_the_iterations_before_the_last_e_step_are_not_screened(tmp_path, monkeypatch):
    """BA's M-step multiplies a code's share by its likelihood ratio: here a code that the screen
    would drop from the first iteration (its share at the floor) is at e^−30 or less after it and
    above e^−10 two iterations later, so the iterations run dense and give the same prior with the
    screen on or off."""
    cfg = tiny_config(tmp_path, quantizer="ba_vq", codebook_size=K, latent_dim=D, ba_iters=4, ba_prior="running")
    quantizer = vqvae.make_quantizer(cfg)
    _, z, codebook, log_q = case_named("running prior")
    quantizer.prior.copy_(log_q.exp())
    quantizer.beta = 3.0
    after = {}
    for iters in (2, 4):
        quantizer.ba_iters = iters
        after[iters] = quantizer.prior_after_iterations(z, codebook)
    grew = (after[2] < -30) & (after[4] > -10)
    monkeypatch.setattr(vqvae, "BA_SCREEN_MAX_SHARE", 1.0)
    parts = vqvae.ba_screened_logits(z, codebook, quantizer.log_prior(), 3.0, codebook.pow(2).sum(1))
    kept = torch.zeros(K, dtype=torch.bool)
    kept[torch.cat([part[2] for part in parts])] = True
    assert (grew & ~kept).any()                      # a screened first iteration would have dropped it
    monkeypatch.setattr(vqvae, "BA_SCREEN_TOL", 0.0)
    assert torch.equal(quantizer.prior_after_iterations(z, codebook), after[4])


def test_screened_nearest_code_with_a_bias_is_the_exact_one():
    """BA's evaluation rule (nearest code under the bias σ·log Q/β) through the screen, floors and −inf included."""
    for name, z, codebook, log_q in cases():
        bias = 0.05 * log_q
        got = vqvae.nearest_code_screened(z, codebook, bias)
        score = 2 * z.double() @ codebook.double().t() - codebook.double().pow(2).sum(1) + bias.double()
        top2 = score.topk(2, dim=1)
        clear = top2.values[:, 0] - top2.values[:, 1] > 1e-5 * (z.double().pow(2).sum(1) + codebook.double().pow(2).sum(1).max())
        assert clear.float().mean() > 0.5, name
        assert torch.equal(got[clear], top2.indices[clear, 0]), name
        assert torch.equal(got, vqvae.nearest_code(z, codebook, bias)), name   # nearest_code takes the screen


def test_a_training_step_with_the_screen_matches_one_without(tmp_path, monkeypatch):
    """A BA forward and backward at K = 2,048 (soft output, entropy term, codebook by gradient: every
    gradient path) with the screen on and off: the same codes, and losses and gradients within 10⁻³ of
    each one's scale (the dense path's fp32 logits, of magnitude β·‖c‖² ≈ 340 here, are rounded by
    3·10⁻⁵, and the gradient carries a factor 2β; the float64 comparisons of the E-step above are the
    tight ones). A code the screen missed or a wrong sparse sum would move them by their scale."""
    cfg = tiny_config(tmp_path, quantizer="ba_vq", codebook_size=K, latent_dim=D, ba_output="soft",
                      ba_codebook_update="grad", entropy_weight=0.1, ba_prior="running", beta_start=20.0,
                      beta_end=20.0, beta_units="absolute", ba_iters=2)
    torch.manual_seed(3)
    z_e = torch.randn(8, D, 8, 8)
    codebook = z_e.permute(0, 2, 3, 1).reshape(-1, D)[torch.randperm(512)].repeat(4, 1) + 0.3 * torch.randn(K, D)
    runs, screened = {}, []
    real = vqvae.ba_screened_logits
    monkeypatch.setattr(vqvae, "ba_screened_logits", lambda *a: screened.append(real(*a)) or screened[-1])
    for name, tol in (("screened", vqvae.BA_SCREEN_TOL), ("dense", 0.0)):
        monkeypatch.setattr(vqvae, "BA_SCREEN_TOL", tol)
        quantizer = vqvae.make_quantizer(cfg).train()
        quantizer.codebook.data.copy_(codebook)
        x = z_e.clone().requires_grad_()
        z_q, losses, idx = quantizer(x)
        (z_q.pow(2).sum() + sum(losses.values())).backward()
        runs[name] = idx, {"z_q": z_q.detach(), "grad z": x.grad, "grad codebook": quantizer.codebook.grad,
                           **{key: value.detach().reshape(1) for key, value in losses.items()}}
    assert screened[0] is not None and screened[1] is None        # the screen ran, then the dense path
    assert torch.equal(runs["screened"][0], runs["dense"][0])
    for key, want in runs["dense"][1].items():
        assert torch.allclose(runs["screened"][1][key], want, rtol=0, atol=1e-3 * want.abs().max().item()), key
