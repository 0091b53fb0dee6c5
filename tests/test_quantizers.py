import math

import pytest
import torch

import study
import vqvae
from conftest import set_chunk_rows


def make(quantizer, **overrides):
    cfg = vqvae.load_config(overrides=dict(quantizer=quantizer, codebook_size=16, latent_dim=4) | overrides)
    return vqvae.make_quantizer(cfg)


def latents(B=2, D=4, H=3, W=3, scale=1.0, requires_grad=False):
    return (torch.randn(B, D, H, W) * scale).requires_grad_(requires_grad)


def lookup(codebook, idx):
    """The codebook rows of idx (B, H, W), laid out as z_q (B, D, H, W)."""
    return codebook[idx].permute(0, 3, 1, 2)


# --- VQ-EMA ----------------------------------------------------------------------------------


def test_vq_ema_straight_through_gradient_reaches_z_e():
    q = make("vq_ema").train()
    z_e = latents(requires_grad=True)
    z_q, _, _ = q(z_e)
    upstream = torch.randn_like(z_q)
    (z_q * upstream).sum().backward()
    assert torch.allclose(z_e.grad, upstream)


def test_vq_ema_commitment_gradient_pulls_z_e_to_its_code():
    q = make("vq_ema", commitment_weight=0.5).eval()
    z_e = latents(requires_grad=True)
    z_q, losses, _ = q(z_e)
    losses["commitment"].backward()
    expected = 0.5 * 2 * (z_e - z_q).detach() / z_e.numel()
    assert torch.allclose(z_e.grad, expected, atol=1e-7)


def test_vq_ema_update_equals_hand_computation():
    q = make("vq_ema", codebook_size=2, latent_dim=2, ema_decay=0.5, ema_eps=1e-5).train()
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
        q.embed_sum.copy_(q.codebook)
    # three vectors: two nearest code 0, one nearest code 1
    z_e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]).t().reshape(1, 2, 1, 3)
    _, _, idx = q(z_e)
    assert idx.flatten().tolist() == [0, 0, 1]
    # cluster_size = 0.5·1 + 0.5·(2, 1) = (1.5, 1.0); embed_sum = 0.5·old + 0.5·(sums) = ((.5,.5), (9.5,9.5))
    # Laplace: n = 2.5, smoothed_k = (size_k + eps) / (n + 2·eps) · n
    eps, n = 1e-5, 2.5
    smoothed = [(1.5 + eps) / (n + 2 * eps) * n, (1.0 + eps) / (n + 2 * eps) * n]
    expected = torch.tensor([[0.5 / smoothed[0]] * 2, [9.5 / smoothed[1]] * 2])
    assert torch.allclose(q.cluster_size, torch.tensor([1.5, 1.0]))
    assert torch.allclose(q.codebook, expected, atol=1e-6)


def test_vq_ema_codebook_does_not_move_in_eval():
    q = make("vq_ema").eval()
    before = q.codebook.clone()
    q(latents())
    assert torch.equal(q.codebook, before)


def test_vq_ema_index_is_nearest_code():
    q = make("vq_ema").eval()
    z_e = latents()
    _, _, idx = q(z_e)
    d = vqvae.squared_distances(vqvae.flatten_latents(z_e), q.codebook)
    assert torch.equal(idx.flatten(), d.argmin(1))


def rotation_grad(z, q, g):
    """dL/dz of L = g·rotate_to(z, q), and the forward value."""
    z = z.clone().requires_grad_(True)
    out = vqvae.rotate_to(z, q)
    (out * g).sum().backward()
    return out.detach(), z.grad


def test_rotation_trick_hand_computed_2d_case():
    # z along x, code along y with twice the length: R is the +90° rotation, s = 2, so the gradient
    # is s·Rᵀg: g = y → 2·x, g = x → −2·y
    z, q = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    value, grad = rotation_grad(z, q, torch.tensor([[0.0, 1.0]]))
    assert torch.allclose(value, q)
    assert torch.allclose(grad, torch.tensor([[2.0, 0.0]]), atol=1e-6)
    _, grad = rotation_grad(z, q, torch.tensor([[1.0, 0.0]]))
    assert torch.allclose(grad, torch.tensor([[0.0, -2.0]]), atol=1e-6)


def test_rotation_trick_value_is_the_code_and_gradient_is_rotated_and_scaled():
    z, q, g = torch.randn(64, 8), torch.randn(64, 8) * 3, torch.randn(64, 8)
    value, grad = rotation_grad(z, q, g)
    assert torch.allclose(value, q, atol=1e-5)
    s = q.norm(dim=1) / z.norm(dim=1)
    assert torch.allclose(grad.norm(dim=1), s * g.norm(dim=1), rtol=1e-4)          # R is orthogonal
    # the code's direction maps back to z's direction
    _, grad = rotation_grad(z, q, q / q.norm(dim=1, keepdim=True))
    assert torch.allclose(grad, s[:, None] * z / z.norm(dim=1, keepdim=True), atol=1e-5)
    # a code in z's own direction: no rotation, only the scale
    _, grad = rotation_grad(z, 2 * z, g)
    assert torch.allclose(grad, 2 * g, atol=1e-5)


def test_vq_ema_rotation_estimator_outputs_the_code_and_differs_from_ste():
    ste, rot = make("vq_ema").train(), make("vq_ema", grad_estimator="rotation").train()
    rot.load_state_dict(ste.state_dict())
    z_e = latents(requires_grad=True)
    upstream = torch.randn(2, 4, 3, 3)
    grads = []
    for q in (ste, rot):
        codebook = q.codebook.clone()                                    # before this step's EMA update
        z_q, _, idx = q(z_e)
        assert torch.allclose(z_q, lookup(codebook, idx), atol=1e-5)     # forward value: the code
        grads.append(torch.autograd.grad((z_q * upstream).sum(), z_e)[0])
    assert torch.allclose(grads[0], upstream)
    assert not torch.allclose(grads[1], upstream)


def test_dead_codes_are_reseeded_from_batch_outputs():
    q, plain = (make("vq_ema", codebook_size=4, latent_dim=2, dead_code_threshold=t).train() for t in (0.5, 0.0))
    with torch.no_grad():
        for m in (q, plain):
            m.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [100.0, 100.0], [-100.0, 100.0]]))
            m.embed_sum.copy_(m.codebook)
            m.cluster_size.copy_(torch.tensor([5.0, 5.0, 0.5, 0.1]))
    z_e = torch.tensor([[0.1, 0.0], [0.0, 0.1], [1.0, 0.9], [0.9, 1.0]]).t().reshape(1, 2, 1, 4)
    q(z_e)
    plain(z_e)
    rows = vqvae.flatten_latents(z_e)
    # codes 2 and 3 won nothing: their usage decays below 0.5, so each now sits on a batch vector
    for k in (2, 3):
        assert (q.codebook[k] == rows).all(1).any(), k
        assert q.cluster_size[k] == 0.5 and torch.allclose(q.embed_sum[k], 0.5 * q.codebook[k])
    # live codes took the plain EMA update and nothing else
    assert torch.equal(q.cluster_size[:2], plain.cluster_size[:2]) and torch.equal(q.codebook[:2], plain.codebook[:2])


def test_no_reseeding_without_threshold_or_in_eval():
    for q, mode in ((make("vq_ema", codebook_size=4, latent_dim=2), "train"),
                    (make("vq_ema", codebook_size=4, latent_dim=2, dead_code_threshold=10.0), "eval")):
        q.train(mode == "train")
        with torch.no_grad():
            q.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [100.0, 100.0], [-100.0, 100.0]]))
            q.embed_sum.copy_(q.codebook)
        q(latents(B=1, D=2, H=1, W=4))
        assert (q.codebook[2:].abs() > 50).all(), mode                              # still far from the data


def test_ba_ema_codebook_reseeds_dead_codes():
    q = make("ba_vq", codebook_size=4, latent_dim=2, ba_codebook_update="ema", dead_code_threshold=0.5).train()
    q.beta = 5.0
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [100.0, 100.0], [-100.0, 100.0]]))
        q.embed_sum.copy_(q.codebook)
        q.cluster_size.fill_(0.5)
    z_e = torch.tensor([[0.1, 0.0], [0.0, 0.1], [1.0, 0.9], [0.9, 1.0]]).t().reshape(1, 2, 1, 4)
    q(z_e)
    for k in (2, 3):
        assert (q.codebook[k] == vqvae.flatten_latents(z_e)).all(1).any(), k


@pytest.mark.parametrize("reseed_prior", ["keep", "uniform"])
def test_ba_reseeded_codes_prior_share(reseed_prior):
    """Codes 2 and 3 are dead: with keep their running-prior shares stay as they decayed; with
    uniform they restart at 1/K = 0.25 and the prior is renormalised: (0.6, 0.39, 0.25, 0.25) / 1.49."""
    q = make("ba_vq", codebook_size=4, latent_dim=2, ba_codebook_update="ema", dead_code_threshold=0.5,
             ba_prior="running", ba_reseed_prior=reseed_prior).train()
    before = torch.tensor([0.6, 0.39, 0.009, 0.001])
    with torch.no_grad():
        q.prior.copy_(before)
        q.cluster_size.copy_(torch.tensor([5.0, 5.0, 0.1, 0.1]))
    moved = q.reseed_dead_codes(torch.randn(8, 2))
    assert moved.tolist() == [False, False, True, True]
    expected = before if reseed_prior == "keep" else torch.tensor([0.6, 0.39, 0.25, 0.25]) / 1.49
    assert torch.allclose(q.prior, expected) and torch.isclose(q.prior.sum(), torch.tensor(1.0))


# --- BA ----------------------------------------------------------------------------------------


def assign(q, z):
    """p(k|e) (N, K) of the last E-step, whole, and its batch mean Q."""
    p = study.ba_probabilities(q, z)
    return p, p.mean(0)


def ba(beta=1.0, **overrides):
    q = make("ba_vq", **overrides).train()
    with torch.no_grad():
        q.codebook.normal_()
    q.beta = beta
    return q


def test_ba_rows_sum_to_one():
    q = ba(beta=2.0, ba_iters=3)
    z = vqvae.flatten_latents(latents())
    p, Q = assign(q, z)
    assert torch.allclose(p.sum(1), torch.ones(len(z)))
    assert Q.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_ba_m_step_is_batch_mean_and_drops_only_a_row_constant():
    """Two iterations by hand with the full squared distance: E with uniform Q, M: Q = mean p, E again."""
    q = ba(beta=1.5, ba_iters=2)
    z = vqvae.flatten_latents(latents())
    d = vqvae.squared_distances(z, q.codebook)
    K = q.codebook_size
    p1 = torch.softmax(math.log(1 / K) - 1.5 * d, dim=1)
    Q1 = p1.mean(0)
    p2 = torch.softmax(Q1.log() - 1.5 * d, dim=1)
    p, Q = assign(q, z)
    assert torch.allclose(p, p2, atol=1e-5)
    assert torch.allclose(Q, p2.mean(0), atol=1e-6)


def test_ba_large_beta_reproduces_argmin():
    q = ba(beta=1e4)
    z = vqvae.flatten_latents(latents())
    p, _ = assign(q, z)
    nearest = vqvae.squared_distances(z, q.codebook).argmin(1)
    assert torch.equal(p.argmax(1), nearest)
    assert torch.allclose(p.max(1).values, torch.ones(len(z)), atol=1e-4)


def test_ba_zero_beta_with_fixed_prior_returns_the_prior():
    q = ba(beta=1e-9, ba_prior="running")
    Q = torch.rand(q.codebook_size) + 0.1
    q.prior.copy_(Q / Q.sum())
    p, _ = assign(q, vqvae.flatten_latents(latents()))
    assert torch.allclose(p, q.prior.expand_as(p), atol=1e-6)


def test_ba_beta_10_with_distances_1e4_stays_finite():
    q = ba(beta=10.0, ba_iters=3)
    z_e = latents(scale=60.0, requires_grad=True)  # squared distances to the N(0,1) codes ~ 1e4
    d = vqvae.squared_distances(vqvae.flatten_latents(z_e.detach()), q.codebook)
    assert d.mean() > 5e3
    z_q, losses, _ = q(z_e)
    total = sum(losses.values()) + z_q.square().mean()
    total.backward()
    assert torch.isfinite(total)
    assert torch.isfinite(z_e.grad).all() and torch.isfinite(q.codebook.grad).all()


def test_ba_hard_output_is_the_argmax_code_and_soft_is_the_expectation():
    z_e = latents()
    hard = ba(beta=0.7, ba_output="hard_soft_grad")
    z_q, _, idx = hard(z_e)
    assert torch.allclose(z_q, lookup(hard.codebook, idx), atol=1e-6)

    soft = ba(beta=0.7, ba_output="soft")
    z_q, _, _ = soft(z_e)
    p, _ = assign(soft, vqvae.flatten_latents(z_e))
    assert torch.allclose(vqvae.flatten_latents(z_q), p @ soft.codebook, atol=1e-6)


def test_ba_hard_output_carries_the_soft_gradient():
    """The hard output's gradient, to the encoder and to the codebook, is that of the soft output
    Σ_k p(k|e)·c_k with p = softmax(−β·‖e − c‖²) (one iteration, uniform prior), by plain autograd."""
    q = ba(beta=0.7)
    z_e, w = latents(requires_grad=True), latents()
    (q(z_e)[0] * w).sum().backward()
    z = vqvae.flatten_latents(z_e.detach()).double().requires_grad_()
    c = q.codebook.detach().double().requires_grad_()
    p = torch.softmax(-0.7 * ((z[:, None, :] - c[None, :, :]) ** 2).sum(-1), 1)
    ((p @ c) * vqvae.flatten_latents(w).double()).sum().backward()
    torch.testing.assert_close(vqvae.flatten_latents(z_e.grad).double(), z.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(q.codebook.grad.double(), c.grad, rtol=1e-4, atol=1e-6)


def test_ba_running_prior_is_an_ema_of_the_batch_marginal():
    q = ba(beta=1.0, ba_prior="running")
    z_e = latents()
    before = q.prior.clone()
    _, Q = assign(q, vqvae.flatten_latents(z_e))
    q(z_e)
    d = vqvae.PRIOR_DECAY
    assert torch.allclose(q.prior, d * before + (1 - d) * Q.detach(), atol=1e-7)


def test_ba_ema_codebook_update_uses_soft_counts():
    q = ba(beta=1.0, ba_codebook_update="ema", ema_decay=0.5)
    z_e = latents(requires_grad=True)
    z = vqvae.flatten_latents(z_e.detach())
    p, _ = assign(q, z)
    size0, sum0 = q.cluster_size.clone(), q.embed_sum.clone()
    z_q, losses, _ = q(z_e)
    (sum(losses.values()) + z_q.sum()).backward()  # the in-place EMA must not break autograd
    assert torch.allclose(q.cluster_size, 0.5 * size0 + 0.5 * p.sum(0), atol=1e-5)
    assert torch.allclose(q.embed_sum, 0.5 * sum0 + 0.5 * p.t() @ z, atol=1e-5)
    assert "codebook" not in losses and not q.codebook.requires_grad


def test_ba_entropy_loss_is_minus_weighted_entropy_of_Q():
    q = ba(beta=1.0, entropy_weight=0.3)
    z_e = latents()
    _, Q = assign(q, vqvae.flatten_latents(z_e))
    _, losses, _ = q(z_e)
    assert losses["entropy"].item() == pytest.approx(0.3 * (Q * Q.log()).sum().item(), rel=1e-5)


def test_ba_relative_beta_sets_sigma_from_the_nearest_codes_then_follows_an_ema():
    q = ba(beta=2.0, beta_units="relative")
    z_e = latents()
    z = vqvae.flatten_latents(z_e)
    d = vqvae.squared_distances(z, q.codebook)
    _, _, idx = q(z_e)                                  # first training step: σ measured, then one EMA step
    nearest = d.min(1).values.mean()
    assigned = d.gather(1, idx.reshape(-1, 1)).mean()
    assert q.scale_measured
    assert q.distance_scale.item() == pytest.approx((0.99 * nearest + 0.01 * assigned).item(), rel=1e-5)


def test_ba_relative_beta_divides_distances_by_sigma():
    """p(k|e) = softmax(log Q − β·‖e − c‖²/σ), and the soft output and its gradients are those of
    the plain definition with β/σ, for both E-step paths."""
    for fast in (True, False):
        q = ba(beta=1.3, beta_units="relative", ba_output="soft", ba_iters=2, ba_fast_path=fast)
        q.distance_scale.fill_(4.0)
        q.scale_measured = True
        z_e, w = latents(requires_grad=True), latents()
        p_model = study.ba_probabilities(q, vqvae.flatten_latents(z_e.detach()), q.codebook)  # before the step moves σ
        (q(z_e)[0] * w).sum().backward()
        z = vqvae.flatten_latents(z_e.detach()).double().requires_grad_()
        c = q.codebook.detach().double().requires_grad_()
        d = ((z[:, None, :] - c[None, :, :]) ** 2).sum(-1) / 4.0
        Q1 = torch.softmax(-1.3 * d.detach(), 1).mean(0)           # M-step, without autograd (default)
        p = torch.softmax(Q1.log() - 1.3 * d, 1)
        ((p @ c) * vqvae.flatten_latents(w).double()).sum().backward()
        torch.testing.assert_close(vqvae.flatten_latents(z_e.grad).double(), z.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(q.codebook.grad.double(), c.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(p_model.double(), p.detach(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("units", ["relative", "critical", "absolute"])
def test_ba_relative_beta_makes_assignments_independent_of_the_latent_scale(units):
    """Scaling latents and codes by a scales every squared distance by a²: with relative units the
    assignments, Q and the codes stay the same and z_q scales by a; with absolute units they do not."""
    torch.manual_seed(5)
    z_e = latents()
    out = []
    for a in (1.0, 7.0):
        q = ba(beta=1.0, beta_units=units, ba_output="soft")
        with torch.no_grad():
            q.codebook.copy_(torch.randn(16, 4, generator=torch.Generator().manual_seed(6)) * a)
        z_q, losses, idx = q(z_e * a)
        out.append((z_q / a, losses["entropy"], idx, study.ba_probabilities(q, vqvae.flatten_latents(z_e * a), q.codebook)))
    (zq1, h1, i1, p1), (zq7, h7, i7, p7) = out
    same = torch.allclose(p1, p7, atol=1e-5)
    assert same == (units != "absolute")
    if units != "absolute":
        assert torch.equal(i1, i7) and torch.allclose(zq1, zq7, atol=1e-5) and torch.allclose(h1, h7, atol=1e-6)


def test_ba_relative_beta_eval_code_with_running_prior():
    q = ba(beta=2.0, beta_units="relative", ba_prior="running")
    Q = torch.rand(q.codebook_size)
    q.prior.copy_(Q / Q.sum())
    q.distance_scale.fill_(0.25)
    q.scale_measured = True
    q.eval()
    z_e = latents()
    _, _, idx = q(z_e)
    z = vqvae.flatten_latents(z_e)
    expected = (q.prior.log() - 2.0 * vqvae.squared_distances(z, q.codebook) / 0.25).argmax(1)
    assert torch.equal(idx.flatten(), expected)
    assert q.distance_scale.item() == 0.25  # evaluation does not move σ


def test_ba_relative_beta_sigma_survives_a_state_dict_round_trip():
    q = ba(beta=1.0, beta_units="relative")
    q(latents())
    r = make("ba_vq", beta_units="relative")
    r.load_state_dict(q.state_dict())
    assert r.scale_measured and torch.equal(r.distance_scale, q.distance_scale)


def test_ba_critical_beta_sigma_is_twice_the_largest_eigenvalue_of_the_latent_covariance():
    q = ba(beta=1.0, beta_units="critical")
    z = torch.randn(500, 4) @ torch.diag(torch.tensor([3.0, 1.0, 0.5, 0.2])) + torch.tensor([5.0, -2.0, 0.0, 1.0])
    z_e = z.t().reshape(1, 4, 1, 500)
    cov = torch.cov(z.double().t(), correction=0)
    lam = torch.linalg.eigvalsh(cov)[-1].item()
    q(z_e)                                              # first step: σ = 2λ_max, then an EMA step of the same
    assert q.distance_scale.item() == pytest.approx(2 * lam, rel=1e-4)


@pytest.mark.parametrize("beta,splits", [(0.8, False), (1.25, True)])
def test_ba_critical_beta_one_is_the_first_phase_transition(beta, splits):
    """Deterministic annealing (Rose 1998) on fixed points: codes all at the data mean stay merged
    under the fixed-point iteration c_k ← Σ_n p(k|e_n)·e_n / Σ_n p(k|e_n) below β = 1 in critical
    units, and split along the principal axis above it."""
    torch.manual_seed(0)
    z = torch.randn(2000, 4) * torch.tensor([2.0, 1.0, 0.7, 0.5])
    q = ba(beta=beta, beta_units="critical", codebook_size=4).eval()  # eval: σ measured on z, not stored
    c = z.mean(0) + 1e-3 * torch.randn(4, 4)
    for _ in range(300):
        p = study.ba_probabilities(q, z, c)                                  # (N, K)
        c = (p.t() @ z) / p.sum(0).unsqueeze(1)
    spread = (c - c.mean(0)).norm(dim=1).max().item()
    assert (spread > 0.5) if splits else (spread < 1e-4)


def test_ba_ste_output_is_the_code_with_the_identity_gradient_to_the_encoder():
    """ba_output hard_ste: the decoder sees the argmax code and the encoder gets the decoder's gradient
    unchanged, while the codebook still learns through p(k|e) (its loss) as with ba_output hard_soft_grad."""
    q = ba(beta=0.7, ba_output="hard_ste")
    z_e, w = latents(requires_grad=True), latents()
    z_q, losses, idx = q(z_e)
    assert torch.allclose(z_q, lookup(q.codebook, idx), atol=1e-6)
    (z_q * w).sum().backward(retain_graph=True)
    assert torch.allclose(z_e.grad, w) and q.codebook.grad is None
    losses["codebook"].backward()
    hard = ba(beta=0.7, ba_output="hard_soft_grad")
    hard.codebook.data.copy_(q.codebook)
    hard(z_e.detach())[1]["codebook"].backward()
    assert q.codebook.grad is not None and torch.allclose(q.codebook.grad, hard.codebook.grad, atol=1e-6)


def saved_nk_elements(q, z_e, at_least):
    """Elements of the distinct tensors of at least `at_least` elements that autograd keeps for
    the backward pass."""
    kept = {}

    def pack(t):
        if t.numel() >= at_least:
            kept[t.untyped_storage().data_ptr()] = t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        q(z_e)
    return sum(kept.values())


@pytest.mark.parametrize("iters", [1, 5])
@pytest.mark.parametrize("update", ["grad", "ema"])
def test_ba_keeps_at_most_one_bounded_nk_matrix_for_backward(monkeypatch, iters, update):
    """p(k|e) is kept for backward only while N·K ≤ KEEP_ELEMENTS, and then once (in chunks),
    whatever ba_iters is; above that nothing of size N×K is kept."""
    N, K = 4 * 64, 256
    q = ba(beta=1.0, ba_iters=iters, codebook_size=K, ba_codebook_update=update)
    z_e = latents(B=4, H=8, W=8, requires_grad=True)
    set_chunk_rows(monkeypatch, 64, K)
    monkeypatch.setattr(vqvae, "KEEP_ELEMENTS", N * K)
    assert saved_nk_elements(q, z_e, 64 * K) == N * K
    monkeypatch.setattr(vqvae, "KEEP_ELEMENTS", N * K - 1)
    assert saved_nk_elements(q, z_e, 64 * K) == 0


def test_vq_ema_keeps_no_nk_matrix_for_backward():
    q = make("vq_ema", codebook_size=256).train()
    z_e = latents(B=4, H=8, W=8, requires_grad=True)
    assert saved_nk_elements(q, z_e, 4 * 64 * 256) == 0


# --- both ------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantizer,extra", [("vq_ema", {}), ("ba_vq", {}), ("ba_vq", {"ba_prior": "running"})])
def test_eval_output_is_the_codebook_lookup_of_the_indices(quantizer, extra):
    q = make(quantizer, **extra)
    if quantizer == "ba_vq":
        q.train()(latents())  # move the running prior away from uniform
    q.eval()
    z_q, _, idx = q(latents())
    assert idx.shape == (2, 3, 3) and idx.dtype == torch.long
    assert torch.equal(z_q, lookup(q.codebook, idx))


def test_ba_eval_code_with_running_prior_is_map_assignment():
    q = ba(beta=2.0, ba_prior="running")
    Q = torch.rand(q.codebook_size)
    q.prior.copy_(Q / Q.sum())
    q.eval()
    z_e = latents()
    _, _, idx = q(z_e)
    z = vqvae.flatten_latents(z_e)
    expected = (q.prior.log() - 2.0 * vqvae.squared_distances(z, q.codebook)).argmax(1)
    assert torch.equal(idx.flatten(), expected)


@pytest.mark.parametrize("quantizer", ["vq_ema", "ba_vq"])
def test_quantizer_math_stays_fp32_under_bf16_autocast(quantizer):
    q = make(quantizer).train()
    z_e = latents().bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_q, losses, _ = q(z_e)
    assert z_q.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in losses.values())


@pytest.mark.parametrize("quantizer", ["vq_ema", "ba_vq"])
def test_gradient_reaches_the_encoder(quantizer):
    cfg = vqvae.load_config(overrides=dict(quantizer=quantizer, codebook_size=16, n_hid=8, latent_dim=4))
    model = vqvae.VQVAE(cfg).train()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    _, losses, _ = model(x)
    losses["recon"].backward()
    first_conv = model.encoder[0].weight
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0


def test_nearest_code_chunks_agree_with_the_full_matrix(monkeypatch):
    z, codebook = torch.randn(300, 5), torch.randn(40, 5)
    full = vqvae.squared_distances(z, codebook).argmin(1)
    set_chunk_rows(monkeypatch, 7, 40)
    assert torch.equal(vqvae.nearest_code(z, codebook), full)


def test_kmeans_finds_separated_clusters():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(100, 2) for c in centres])
    found = vqvae.kmeans(x, 3, iters=5, generator=torch.Generator().manual_seed(0))
    # each true centre has a found centre within 0.1
    assert vqvae.squared_distances(centres, found).min(1).values.max() < 0.01


def test_kmeans_needs_at_least_k_vectors():
    with pytest.raises(vqvae.VQVAEError, match="at least K=8"):
        vqvae.kmeans(torch.randn(5, 2), 8, iters=1, generator=torch.Generator())


def test_beta_schedule_endpoints_and_midpoint():
    q = ba(beta_start=0.5, beta_end=3.0)
    for step, beta in ((0, 0.5), (50, 1.75), (100, 3.0)):
        q.before_step(step, 101)
        assert q.beta == pytest.approx(beta) and q.log_values() == {"beta": q.beta}


def test_ba_ste_with_ema_codebook_and_no_entropy_term_trains_the_encoder_like_vq_ema():
    """ba_output hard_ste, ba_codebook_update ema, entropy_weight 0: nothing reaches the encoder through
    p(k|e), so its gradient is the decoder's (straight through) plus the commitment term, as in
    vq_ema; and the codebook has no gradient (it moves by the soft EMA)."""
    q = ba(beta=0.7, ba_output="hard_ste", ba_codebook_update="ema", entropy_weight=0.0, commitment_weight=0.5)
    z_e, w = latents(requires_grad=True), latents()
    z_q, losses, _ = q(z_e)
    ((z_q * w).sum() + sum(losses.values())).backward()
    expected = w + 0.5 * 2 * (z_e - z_q).detach() / z_e.numel()
    assert torch.allclose(z_e.grad, expected, atol=1e-6)
    assert q.codebook.grad is None and "codebook" not in losses


# --- the BA rule, written once ---------------------------------------------------------------


def test_an_edit_of_ba_logits_reaches_iterations_last_e_step_and_evaluation(monkeypatch):
    """Edit the rule (a large constant added to code 3's logit) with the fast path off: the E/M
    iterations, the last E-step's codes and the evaluation's codes all follow it. The unedited rule
    spreads the latents over several codes."""
    q = ba(beta=1.0, ba_iters=3, ba_fast_path=False, ba_prior="running")
    z_e = latents(B=4)
    z = vqvae.flatten_latents(z_e)
    _, _, before = q.eval()(z_e)
    assert before.unique().numel() > 1
    rule = vqvae.ba_logits
    monkeypatch.setattr(vqvae, "ba_logits", lambda *args, **kwargs: rule(*args, **kwargs) + 50.0 * (
        torch.arange(16) == 3).float())
    log_q = q.train().prior_after_iterations(z, q.codebook)                     # the iterations
    assert log_q.argmax() == 3 and log_q[3] > math.log(0.99)
    _, _, trained = q(z_e)                                                      # the last E-step
    _, _, evaluated = q.eval()(z_e)                                             # evaluation, prior rule
    q.eval_rule = "batch"
    _, _, batch_rule = q(z_e)                                                   # evaluation, batch rule
    assert (trained == 3).all() and (evaluated == 3).all() and (batch_rule == 3).all()


@pytest.mark.parametrize("eval_rule,prior", [("prior", "uniform"), ("prior", "running"), ("batch", "running")])
def test_ba_evaluation_fast_path_finds_the_argmax_of_ba_logits(eval_rule, prior):
    """The nearest-code form of the evaluation rule is an accelerator of argmax_k ba_logits."""
    codes = {}
    for fast in (True, False):
        torch.manual_seed(0)
        q = ba(beta=2.0, ba_iters=2, ba_eval=eval_rule, ba_prior=prior, beta_units="relative", ba_fast_path=fast)
        q.prior.copy_(torch.softmax(torch.randn(16), 0))
        q(latents(B=8))                                                         # σ measured, as in training
        codes[fast] = q.eval()(latents(B=8, scale=2.0))[2]
    assert torch.equal(codes[True], codes[False])


# --- quantizers as plug-ins ------------------------------------------------------------------


def test_an_unknown_quantizer_is_refused_not_replaced():
    cfg = vqvae.dataclasses.replace(vqvae.load_config(), quantizer="bavq")
    with pytest.raises(vqvae.VQVAEError, match="unknown value 'bavq'"):
        vqvae.make_quantizer(cfg)


def test_a_new_quantizer_trains_through_the_contract_alone(tmp_path, monkeypatch):
    """A quantizer the training loop has never heard of: one registered class, no other change."""

    class Sign(vqvae.Quantizer):
        """z_q = sign(z_e) with a straight-through gradient; the code is the sign pattern of 3 channels."""
        codebook_size = 8

        def __init__(self, cfg):
            super().__init__()
            self.steps = 0

        def before_step(self, step, total_steps):
            self.steps += 1

        def log_values(self):
            return {"steps_seen": self.steps}

        def forward(self, z_e):
            z_q = z_e + (torch.sign(z_e) - z_e).detach()
            bits = (z_e[:, :3] > 0).long()
            return z_q, {}, bits[:, 0] + 2 * bits[:, 1] + 4 * bits[:, 2]

    monkeypatch.setitem(vqvae.QUANTIZERS, "sign", Sign)
    from conftest import tiny_config
    final = vqvae.train(tiny_config(tmp_path, quantizer="sign", max_steps=4, log_every=1))
    history = study.read_history(tmp_path / "experiments" / "run")
    assert [r["steps_seen"] for r in history if r["split"] == "train"] == [1, 2, 3, 4]
    assert final["steps_seen"] == 4 and final["dead_codes"] + round(final["usage_rate"] * 8) == 8


# --- FSQ -------------------------------------------------------------------------------------


def fsq(levels=(4, 3, 2), latent_dim=4):
    return vqvae.make_quantizer(vqvae.load_config(overrides=dict(quantizer="fsq", fsq_levels=list(levels),
                                                                 latent_dim=latent_dim)))


def test_fsq_rounds_each_channel_onto_its_grid_of_levels():
    q = fsq()
    z = vqvae.flatten_latents(latents(B=16, scale=3.0))
    bounded = torch.tanh(q.project_in(z))
    q_values = q.level_values(q.digits_of(q(latents(B=16, scale=3.0))[2].flatten()))
    for i, L in enumerate((4, 3, 2)):
        grid = torch.linspace(-1, 1, L)
        assert ((q_values[:, i, None] - grid).abs().min(1).values < 1e-6).all()  # on the grid of L levels
    # the nearest level of the bounded value: |q − tanh(Wz)| at most half a step
    digits = ((bounded + 1) * (q.levels - 1) / 2).round()
    assert ((q.level_values(digits) - bounded).abs() <= 1 / (q.levels - 1) + 1e-6).all()


def test_fsq_indices_round_trip_and_every_code_is_reachable():
    q = fsq((4, 3, 2))
    assert q.codebook_size == 24 and vqvae.FSQ.num_codes(vqvae.load_config(overrides=dict(
        quantizer="fsq", fsq_levels=[8, 8, 8, 6, 5]))) == 15360
    every = torch.arange(24)
    digits = q.digits_of(every)
    assert len({tuple(d) for d in digits.tolist()}) == 24                       # every index is a distinct code
    assert torch.equal((digits * q.radix).sum(1), every)                        # index → digits → index
    # and every code is reached by some latent: steer project_in so channel values sweep the grid
    with torch.no_grad():
        q.project_in.weight.copy_(torch.eye(3, 4) * 10)
        q.project_in.bias.zero_()
        grid = torch.cartesian_prod(*[torch.linspace(-0.99, 0.99, L) for L in (4, 3, 2)])  # (24, 3) targets
        z = torch.cat([torch.atanh(grid) / 10, torch.zeros(24, 1)], 1)          # (24, 4)
    idx = q(z.view(24, 4, 1, 1))[2].flatten()
    assert sorted(idx.tolist()) == list(range(24))


def test_fsq_gradient_is_straight_through_the_rounding():
    q = fsq()
    z_e = latents(requires_grad=True)
    z_q, losses, _ = q(z_e)
    assert losses == {}
    w = latents()
    (z_q * w).sum().backward()
    # the same gradient as without rounding: project_out(tanh(project_in(z)))
    z_ref = z_e.detach().clone().requires_grad_(True)
    flat = vqvae.flatten_latents(z_ref)
    ref = vqvae.unflatten_latents(q.project_out(torch.tanh(q.project_in(flat))), z_ref)
    (ref * w).sum().backward()
    torch.testing.assert_close(z_e.grad, z_ref.grad)


def test_fsq_learns_on_synthetic_images(tmp_path):
    from conftest import tiny_config
    cfg = tiny_config(tmp_path, quantizer="fsq", fsq_levels=[5, 4, 4], epochs=7, max_steps=50, log_every=1, lr=2e-3)
    final = vqvae.train(cfg)
    recon = [r["recon"] for r in study.read_history(vqvae.run_dir_of(cfg)) if r["split"] == "train"]
    assert sum(recon[-5:]) / 5 < 0.7 * sum(recon[:5]) / 5
    for key in ("psnr", "psnr_legacy", "perplexity", "usage_rate", "dead_codes", "psnr_batch", "perplexity_batch",
                "usage_batch"):
        assert key in final
    assert 1 <= final["perplexity"] <= 80 and final["dead_codes"] == 80 - round(final["usage_rate"] * 80)
