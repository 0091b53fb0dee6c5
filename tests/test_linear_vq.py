"""linear_vq.py: hand-derived gradients against autograd and finite differences, the Stiefel constraint,
the rotation estimator on a hand example, PCA + Lloyd-Max on planted data, metrics and bounds on hand
cases, and the command line."""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

import linear_vq as L

TINY = L.LinearConfig(data_dim=6, latent_dim=2, codebook_size=3, n_train=256, n_test=64, batch_size=64,
                      steps=6, verify_steps=4, convergence_steps=8, eval_every=2, lloyd_iters=20)


def tiny_point(seed=0, B=7, cfg=TINY, orthonormal=True):
    """(w (D, m), codebook (K, m), x (B, D)) drawn at random."""
    rng = np.random.default_rng(seed)
    w = L.random_stiefel(cfg.data_dim, cfg.latent_dim, rng) if orthonormal else rng.standard_normal(
        (cfg.data_dim, cfg.latent_dim))
    return w, rng.standard_normal((cfg.codebook_size, cfg.latent_dim)), rng.standard_normal((B, cfg.data_dim))


# --- gradients ------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta, alpha, orthonormal", [(0.25, 1.0, True), (0.0, 1.0, True), (1.0, 0.5, False),
                                                      (2.0, 0.0, False)])
def test_manual_gradients_equal_autograd(beta, alpha, orthonormal):
    cfg = dataclasses.replace(TINY, commitment_weight=beta, codebook_weight=alpha)
    w, codebook, x = tiny_point(orthonormal=orthonormal)
    losses_m, gw_m, gc_m = L.manual_grads(w, codebook, x, cfg)
    losses_a, gw_a, gc_a = L.autograd_grads(w, codebook, x, cfg)
    np.testing.assert_allclose(gw_m, gw_a, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gc_m, gc_a, rtol=1e-12, atol=1e-12)
    assert losses_m.keys() == losses_a.keys()
    for key in losses_m:
        assert losses_m[key] == pytest.approx(losses_a[key], rel=1e-12, abs=1e-12)
    assert np.abs(gw_m).max() > 0


def surrogate_loss(w, codebook, x, base_w, base_codebook, cfg):
    """The loss with the code choice and every sg(·) frozen at (base_w, base_codebook): a smooth function
    whose ordinary gradient at the base point is the straight-through gradient."""
    z0 = x @ base_w
    idx = L.nearest(z0, base_codebook)
    c0 = base_codebook[idx]
    z, c = x @ w, codebook[idx]
    z_q = z + (c0 - z0)                                   # = c0 at the base point, ∂z_q/∂z = I
    recon = ((z_q @ w.T - x) ** 2).sum(1).mean()
    return (recon + cfg.codebook_weight * ((z0 - c) ** 2).sum(1).mean()
            + cfg.commitment_weight * ((z - c0) ** 2).sum(1).mean())


def test_manual_gradients_equal_finite_differences():
    w, codebook, x = tiny_point(seed=3, orthonormal=False)
    _, grad_w, grad_codebook = L.manual_grads(w, codebook, x, TINY)
    h = 1e-6
    for param, grad in ((w, grad_w), (codebook, grad_codebook)):
        numeric = np.zeros_like(param)
        for i in np.ndindex(param.shape):
            plus, minus = param.copy(), param.copy()
            plus[i] += h
            minus[i] -= h
            args = {id(w): (plus, codebook, minus, codebook), id(codebook): (w, plus, w, minus)}[id(param)]
            numeric[i] = (surrogate_loss(args[0], args[1], x, w, codebook, TINY)
                          - surrogate_loss(args[2], args[3], x, w, codebook, TINY)) / (2 * h)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


def test_commitment_one_cancels_the_straight_through_term():
    cfg = dataclasses.replace(TINY, commitment_weight=1.0)
    w, codebook, x = tiny_point(seed=5)
    _, grad_w, _ = L.manual_grads(w, codebook, x, cfg)
    c = codebook[L.nearest(x @ w, codebook)]
    decoder_only = 2 / len(x) * (c @ w.T - x).T @ c
    np.testing.assert_allclose(grad_w, decoder_only, atol=1e-12)


# --- the rotation estimator -------------------------------------------------------------------------


def test_rotation_forward_is_the_hard_code():
    w, codebook, x = tiny_point(seed=1)
    _, z_q, idx = L.torch_forward(torch.from_numpy(w), torch.from_numpy(codebook), torch.from_numpy(x), TINY,
                                  "rotation")
    np.testing.assert_array_equal(idx.numpy(), L.nearest(x @ w, codebook))
    np.testing.assert_allclose(z_q.detach().numpy(), codebook[idx.numpy()], rtol=0, atol=1e-15)


def test_rotation_gradient_on_a_hand_example():
    # W_e = I (D = m = 2), x = (1, 0), one code c = (0, 2): z = (1, 0), and the rotation taking z's
    # direction to c's is R = [[0, −1], [1, 0]], with scale s = ‖c‖/‖z‖ = 2. With g = ∂L/∂z_q =
    # 2(c − x) = (−2, 4): rotation ∂L/∂z = s·Rᵀ·g = (8, 4), straight-through ∂L/∂z = g. ∂L/∂W_e =
    # xᵀ·∂L/∂z (encoder) + 2·rᵀ·c (decoder, r = c − x = (−1, 2)): [[8, 0], [0, 8]] vs [[−2, 0], [0, 8]].
    cfg = dataclasses.replace(TINY, data_dim=2, latent_dim=2, codebook_size=1, commitment_weight=0.0)
    w, codebook, x = np.eye(2), np.array([[0.0, 2.0]]), np.array([[1.0, 0.0]])
    losses, grad_w, grad_codebook = L.rotation_grads(w, codebook, x, cfg)
    assert losses["recon"] == pytest.approx(5.0)
    np.testing.assert_allclose(grad_w, [[8.0, 0.0], [0.0, 8.0]], atol=1e-12)
    np.testing.assert_allclose(grad_codebook, [[-2.0, 4.0]], atol=1e-12)    # 2α(c − z): codebook loss only
    _, grad_w_ste, _ = L.manual_grads(w, codebook, x, cfg)
    np.testing.assert_allclose(grad_w_ste, [[-2.0, 0.0], [0.0, 8.0]], atol=1e-12)


# --- training runs ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_data():
    return L.make_data(TINY)


@pytest.mark.parametrize("method", list(L.GRADIENTS))
def test_encoder_stays_orthonormal(method, tiny_data):
    run = L.fit(method, TINY, tiny_data, seed=0, steps=20)
    np.testing.assert_allclose(run["w"].T @ run["w"], np.eye(TINY.latent_dim), atol=1e-12)


def test_polar_retraction_is_the_nearest_orthonormal_matrix():
    w, _, _ = tiny_point(seed=2)
    np.testing.assert_allclose(L.retract(w), w, atol=1e-12)                # orthonormal: unchanged
    stretch = np.array([[2.0, 0.5], [0.5, 1.0]])                           # symmetric positive definite
    np.testing.assert_allclose(L.retract(w @ stretch), w, atol=1e-12)      # the polar factor of w·S is w


def test_same_seed_same_run_and_methods_share_start_and_batches(tiny_data):
    a = L.fit("manual_ste", TINY, tiny_data, seed=4, eval_every=1)
    b = L.fit("manual_ste", TINY, tiny_data, seed=4, eval_every=1)
    np.testing.assert_array_equal(a["w"], b["w"])
    assert a["curve"] == b["curve"]
    c = L.fit("autograd_ste", TINY, tiny_data, seed=4, eval_every=1)
    assert c["curve"][0] == a["curve"][0]                                   # same start
    for p, q in zip(a["curve"], c["curve"]):
        assert p["mse"] == pytest.approx(q["mse"], rel=1e-12)


def test_start_is_random_even_when_seed_equals_data_seed(tiny_data):
    run = L.fit("manual_ste", TINY, tiny_data, seed=TINY.data_seed, steps=1, eval_every=1)
    assert run["curve"][0]["subspace_gap"] > 0.05


def test_pca_lloyd_recovers_the_planted_subspace():
    cfg = L.LinearConfig(data_dim=16, latent_dim=3, codebook_size=8, noise_var=1e-6, n_train=4000, n_test=500,
                         batch_size=256)
    data = L.make_data(cfg)
    run = L.pca_lloyd(cfg, data, seed=0)
    assert run["final"]["subspace_gap"] < 1e-5
    np.testing.assert_allclose(run["w"].T @ run["w"], np.eye(3), atol=1e-12)
    z = data["x_train"] @ run["w"]
    idx = L.nearest(z, run["codebook"])
    for k in np.unique(idx):                           # Lloyd's fixed point: every code is its cell's mean
        np.testing.assert_allclose(run["codebook"][k], z[idx == k].mean(0), atol=1e-10)


def test_lloyd_never_increases_distortion():
    z = np.random.default_rng(0).standard_normal((500, 2))
    start = L.kmeans_pp(z, 6, np.random.default_rng(1))

    def distortion(codebook):
        return ((z - codebook[L.nearest(z, codebook)]) ** 2).sum(1).mean()

    previous = distortion(start)
    for iters in range(1, 6):
        current = distortion(L.lloyd(z, start, iters))
        assert current <= previous + 1e-12
        previous = current


def test_kmeans_pp_picks_distinct_data_points():
    z = np.random.default_rng(0).standard_normal((10, 3))
    everything = L.kmeans_pp(z, 10, np.random.default_rng(0))
    assert sorted(map(tuple, everything)) == sorted(map(tuple, z))


# --- metrics and bounds -------------------------------------------------------------------------------


def test_evaluate_on_a_hand_case():
    x = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    m = L.evaluate(np.eye(2), np.array([[0.0, 0.0], [10.0, 10.0]]), x, np.eye(2))
    assert m == {"mse": 1.0, "entropy": 0.0, "entropy_ratio": 0.0, "dead_codes": 1, "subspace_gap": 0.0}
    m = L.evaluate(np.eye(2), x.copy(), x, np.eye(2)[:, :1] @ np.ones((1, 2)) / math.sqrt(2))
    assert m["mse"] == 0.0 and m["entropy"] == pytest.approx(math.log(4)) and m["entropy_ratio"] == pytest.approx(1)


def test_rate_distortion_bound_by_reverse_water_filling():
    assert L.gaussian_rd_bound([3.0], math.log(4)) == pytest.approx(3.0 / 16)   # one Gaussian: v·e^(−2R)
    assert L.gaussian_rd_bound([4.0, 1.0], math.log(4)) == pytest.approx(1.0)  # θ = 1/2 on both components
    assert L.gaussian_rd_bound([4.0, 1.0], math.log(2)) == pytest.approx(2.0)  # θ = 1: the weak one gets no rate
    assert L.gaussian_rd_bound([4.0, 1.0], 0.0) == pytest.approx(5.0)          # no rate: all the variance


# --- command line -----------------------------------------------------------------------------------


def tiny_flags():
    return [f"--{k}={v}" for k, v in dataclasses.asdict(TINY).items()]


@pytest.mark.slow
def test_cli_all_writes_every_figure_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "lvq"
    assert L.main(["all", "--out", str(out), "--seeds", "2", *tiny_flags()]) == 0
    for name in L.EXPERIMENTS:
        record = json.loads((out / f"{name}.json").read_text())
        assert record["experiment"] == name and record["seeds"] == [0, 1]
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    verify = json.loads((out / "verify.json").read_text())
    assert verify["summary"]["max_grad_rel_diff"] < 1e-10
    assert len(verify["per_seed"][0]["mse_rel_diff"]) == TINY.verify_steps + 1
    kscale = json.loads((out / "kscale.json").read_text())
    assert set(kscale["rows"]) == {"8", "16", "32", "64"}
    for row in kscale["rows"].values():
        assert row["pca_lloyd"]["mse"]["mean"] >= row["references"]["rd_bound"] * 0.9
    before = (out / "verify.json").read_bytes()
    assert L.main(["verify", "--out", str(out), *tiny_flags()]) == 2
    assert "verify.json exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "verify.json").read_bytes() == before
    assert L.main(["verify", "--out", str(out), "--overwrite", "--seeds", "1", *tiny_flags()]) == 0
    assert json.loads((out / "verify.json").read_text())["seeds"] == [0]


@pytest.mark.parametrize("argv, message", [
    (["kscale", "--codebok_size", "8"], "did you mean '--codebook_size'?"),
    (["verify", "--latent_dim", "10", "--data_dim", "6"], "latent_dim (10) must not exceed data_dim (6)"),
    (["verify", "--dtype", "float16"], "dtype: unknown value 'float16'"),
    (["verify", "--seeds", "0"], "--seeds must be ≥ 1"),
    (["verify", "--noise_var", "-1"], "noise_var must be a finite number ≥ 0"),
    (["verify", "--codebook_size", "2048"], "must not exceed batch_size"),
    (["all", "--batch_size", "32"], "kscale with codebook_size = 64: k-means++ seeds the codebook from one batch"),
])
def test_cli_refuses_bad_input_before_any_work(argv, message, tmp_path, capsys):
    out = tmp_path / "never"
    assert L.main([argv[0], "--out", str(out), *argv[1:]]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
