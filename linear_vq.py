"""Vector quantization with a *linear* encoder on synthetic Gaussian data: a controlled study of
gradient estimators where the optimum subspace is known (PCA) and every gradient can be derived by hand.

    python linear_vq.py {verify,convergence,kscale,commitment,all} --out DIR [--seeds N] [--key value ...]

Data X = A·Y + W: A (D, m) orthonormal columns (the planted subspace), Y ~ N(0, diag(λ)) with a
geometrically decaying spectrum λ, noise W ~ N(0, σ²·I). Model: encoder W_e (D, m) with orthonormal
columns, z = W_eᵀ·x, the nearest of K codes c_k ∈ R^m, decoder tied to the encoder, x̂ = W_e·c_k.
Why tied: with orthonormal W_e the error splits exactly into ‖x − W_e·W_eᵀ·x‖² (what the subspace
misses) + ‖z − c_k‖² (what the codebook misses), so PCA's subspace with a Lloyd codebook inside it is
the reference every method is measured against, and the methods differ only in how they train; a
learned decoder would add parameters this comparison does not need.

Methods: PCA + Lloyd-Max (no gradients); autograd STE (PyTorch); manual STE (the same loss with
gradients derived by hand, NumPy only); the rotation estimator (PyTorch, `vqvae.rotate_to`).
All gradient methods share one loop: SGD on W_e and the codebook, then a polar retraction of W_e.

Shapes: n samples, B batch, D data dimension, m latent dimension, K codebook size.
MSE here is the squared error per sample, summed over the D coordinates: E‖x − x̂‖².
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

import vqvae
from vqvae import VQVAEError, _opt

# ---------------------------------------------------------------------------------------------
# Config: every default lives here, once; command-line flags override it.
# ---------------------------------------------------------------------------------------------


@dataclass
class LinearConfig:
    # --- data: X = A·Y + W
    data_dim: int = _opt(64, "ambient dimension D")
    latent_dim: int = _opt(4, "rank m of the planted subspace, and the encoder's output dimension")
    signal_var: float = _opt(4.0, "variance λ_1 of the strongest latent direction")
    spectrum_decay: float = _opt(0.5, "λ_i = signal_var · spectrum_decay^(i−1): the latent spectrum's ratio")
    noise_var: float = _opt(0.01, "variance σ² of the isotropic noise W, per coordinate")
    n_train: int = _opt(20000, "training samples")
    n_test: int = _opt(10000, "test samples (all metrics are on these)")
    data_seed: int = _opt(0, "seed of the planted subspace and the samples (the same data for every method and seed)")
    # --- model and training
    codebook_size: int = _opt(32, "number of codes K")
    commitment_weight: float = _opt(0.25, "β: weight of ‖z − sg(c)‖² pulling the encoder towards its codes")
    codebook_weight: float = _opt(1.0, "α: weight of ‖sg(z) − c‖² pulling codes towards their encoder outputs")
    lr_encoder: float = _opt(0.08, "SGD learning rate of the encoder W_e")
    lr_codebook: float = _opt(0.2, "SGD learning rate of the codebook")
    batch_size: int = _opt(1024, "training batch size (also the points k-means++ seeds the codebook from)")
    steps: int = _opt(300, "SGD steps of a run (kscale, commitment, and the convergence table's first column)")
    verify_steps: int = _opt(200, "SGD steps of the verify experiment")
    convergence_steps: int = _opt(500, "SGD steps of the convergence experiment")
    lloyd_iters: int = _opt(100, "PCA + Lloyd-Max: most Lloyd iterations (stops earlier when assignments settle)")
    dtype: str = _opt("float64", "float64 or float32, for data, parameters and both gradient paths")
    eval_every: int = _opt(5, "test metrics every N steps in convergence curves (verify: every step)")


CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(LinearConfig))


def validate(cfg: LinearConfig) -> LinearConfig:
    """Reject invalid values with one clear line, before any work."""
    if cfg.dtype not in ("float64", "float32"):
        raise VQVAEError(f"dtype: unknown value '{cfg.dtype}'; choose float64 or float32")
    for key in ("data_dim", "latent_dim", "codebook_size", "n_train", "n_test", "batch_size", "steps", "verify_steps",
                "convergence_steps", "eval_every"):
        if getattr(cfg, key) < 1:
            raise VQVAEError(f"{key} must be ≥ 1, got {getattr(cfg, key)}")
    for key in ("signal_var", "spectrum_decay", "lr_encoder", "lr_codebook"):
        if not math.isfinite(getattr(cfg, key)) or getattr(cfg, key) <= 0:
            raise VQVAEError(f"{key} must be a finite number > 0, got {getattr(cfg, key)}")
    for key in ("noise_var", "commitment_weight", "codebook_weight"):
        if not math.isfinite(getattr(cfg, key)) or getattr(cfg, key) < 0:
            raise VQVAEError(f"{key} must be a finite number ≥ 0, got {getattr(cfg, key)}")
    if cfg.lloyd_iters < 0:
        raise VQVAEError(f"lloyd_iters must be ≥ 0, got {cfg.lloyd_iters}")
    if cfg.latent_dim > cfg.data_dim:
        raise VQVAEError(f"latent_dim ({cfg.latent_dim}) must not exceed data_dim ({cfg.data_dim})")
    if cfg.batch_size > cfg.n_train:
        raise VQVAEError(f"batch_size ({cfg.batch_size}) must not exceed n_train ({cfg.n_train})")
    if cfg.codebook_size > cfg.batch_size:
        raise VQVAEError(f"k-means++ seeds the codebook from one batch: codebook_size ({cfg.codebook_size}) "
                         f"must not exceed batch_size ({cfg.batch_size})")
    return cfg


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def latent_variances(cfg: LinearConfig) -> np.ndarray:
    """λ (m,): the planted latent spectrum, strongest first."""
    return cfg.signal_var * cfg.spectrum_decay ** np.arange(cfg.latent_dim)


def random_stiefel(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random (rows, cols) matrix with orthonormal columns (QR of a Gaussian, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((rows, cols)))
    return q * np.sign(np.diag(r))


def make_data(cfg: LinearConfig) -> dict:
    """{'x_train' (n_train, D), 'x_test' (n_test, D), 'basis' A (D, m)}, all in cfg.dtype."""
    rng = np.random.default_rng([cfg.data_seed, 0])
    basis = random_stiefel(cfg.data_dim, cfg.latent_dim, rng)
    scale = np.sqrt(latent_variances(cfg))

    def sample(n):
        y = rng.standard_normal((n, cfg.latent_dim)) * scale                              # (n, m)
        return y @ basis.T + math.sqrt(cfg.noise_var) * rng.standard_normal((n, cfg.data_dim))

    dtype = np.dtype(cfg.dtype)
    return {"x_train": sample(cfg.n_train).astype(dtype), "x_test": sample(cfg.n_test).astype(dtype),
            "basis": basis.astype(dtype)}


def batch_order(n: int, batch_size: int, seed: int):
    """Endless index batches (batch_size,): successive seeded permutations of range(n), remainder dropped.
    The same seed gives every method the same batches."""
    rng = np.random.default_rng([seed, 2])
    while True:
        perm = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            yield perm[start:start + batch_size]


# ---------------------------------------------------------------------------------------------
# Quantization helpers (NumPy)
# ---------------------------------------------------------------------------------------------


def nearest(z: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """argmin_k ‖z_i − c_k‖² for z (n, m), codebook (K, m) → (n,)."""
    scores = 2 * z @ codebook.T - (codebook ** 2).sum(1)                                  # (n, K)
    return scores.argmax(1)


def kmeans_pp(z: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): k rows of z (n, m), each drawn with probability
    ∝ squared distance to the nearest one already chosen → (k, m)."""
    centers = [z[rng.integers(len(z))]]
    min_d = ((z - centers[0]) ** 2).sum(1, dtype=np.float64)  # float64: the draw needs Σp = 1 closely
    for _ in range(1, k):
        p = min_d / min_d.sum() if min_d.sum() > 0 else np.full(len(z), 1 / len(z))
        centers.append(z[rng.choice(len(z), p=p)])
        min_d = np.minimum(min_d, ((z - centers[-1]) ** 2).sum(1, dtype=np.float64))
    return np.stack(centers)


def lloyd(z: np.ndarray, codebook: np.ndarray, iters: int) -> np.ndarray:
    """Lloyd's algorithm (generalised Lloyd-Max, i.e. k-means) from `codebook` until assignments stop
    changing or `iters` passes; a code left without points keeps its place."""
    codebook, idx = codebook.copy(), None
    for _ in range(iters):
        new_idx = nearest(z, codebook)
        if idx is not None and np.array_equal(new_idx, idx):
            break
        idx = new_idx
        counts = np.bincount(idx, minlength=len(codebook))
        sums = np.zeros_like(codebook)
        np.add.at(sums, idx, z)
        filled = counts > 0
        codebook[filled] = sums[filled] / counts[filled, None]
    return codebook


def retract(w: np.ndarray) -> np.ndarray:
    """Polar retraction onto the Stiefel manifold: U·Vᵀ from w = U·S·Vᵀ, the orthonormal matrix nearest
    to w. Unlike QR it does not depend on column order, so it turns the latent frame (in which the
    codebook lives) as little as possible."""
    u, _, vt = np.linalg.svd(w, full_matrices=False)
    return u @ vt


# ---------------------------------------------------------------------------------------------
# Gradients of the VQ-VAE loss
#     L = (1/B) Σ_i [ ‖W_e·z_q,i − x_i‖² + α‖sg(z_i) − c_i‖² + β‖z_i − sg(c_i)‖² ]
# with z = W_eᵀ·x, c_i = codebook[k_i] (nearest code) and z_q = c in value. Each function returns
# ({loss name: float}, ∂L/∂W_e (D, m), ∂L/∂codebook (K, m)).
# ---------------------------------------------------------------------------------------------


def manual_grads(w: np.ndarray, codebook: np.ndarray, x: np.ndarray, cfg: LinearConfig):
    """Straight-through gradients derived by hand, NumPy only. With r = W_e·c − x (the residual):
        ∂L/∂W_e      = (2/B) [ rᵀ·c            (decoder: x̂ = W_e·c)
                             + xᵀ·(r·W_e + β(z − c)) ]   (encoder: ∂L/∂z_q copied to z, plus commitment)
        ∂L/∂c_k      = (2α/B) Σ_{i: k_i = k} (c_k − z_i)  (codebook loss only: sg blocks the rest)
    With W_eᵀ·W_e = I, r·W_e = c − z, so the encoder term is (1 − β)·xᵀ·(c − z): at β = 1 the
    straight-through copy and the commitment cancel and only the decoder term moves W_e."""
    B, alpha, beta = len(x), cfg.codebook_weight, cfg.commitment_weight
    z = x @ w                                                                            # (B, m)
    idx = nearest(z, codebook)                                                           # (B,)
    c = codebook[idx]                                                                    # (B, m)
    r = c @ w.T - x                                                                      # (B, D)
    grad_w = (2 / B) * (r.T @ c + x.T @ (r @ w + beta * (z - c)))
    grad_codebook = np.zeros_like(codebook)
    np.add.at(grad_codebook, idx, (2 * alpha / B) * (c - z))
    sq = ((z - c) ** 2).sum() / B
    losses = {"recon": float((r ** 2).sum() / B), "codebook": alpha * float(sq), "commitment": beta * float(sq)}
    return losses, grad_w, grad_codebook


def torch_forward(w: torch.Tensor, codebook: torch.Tensor, x: torch.Tensor, cfg: LinearConfig, estimator: str):
    """The model in PyTorch: ({loss name: scalar tensor}, z_q (B, m), indices (B,)). z_q equals the
    nearest code in value; its gradient is the straight-through copy (ste) or the rotation trick."""
    z = x @ w                                                                            # (B, m)
    idx = vqvae.nearest_code(z.detach(), codebook.detach())
    c = codebook[idx]                                                                    # (B, m)
    z_q = vqvae.rotate_to(z, c) if estimator == "rotation" else z + (c - z).detach()
    x_hat = z_q @ w.T                                                                    # (B, D)
    losses = {"recon": (x_hat - x).pow(2).sum(1).mean(),
              "codebook": cfg.codebook_weight * (z.detach() - c).pow(2).sum(1).mean(),
              "commitment": cfg.commitment_weight * (z - c.detach()).pow(2).sum(1).mean()}
    return losses, z_q, idx


def autograd_grads(w: np.ndarray, codebook: np.ndarray, x: np.ndarray, cfg: LinearConfig, estimator: str = "ste"):
    """The gradients PyTorch's autograd gives for torch_forward's loss, in the arrays' dtype."""
    w_t = torch.from_numpy(w.copy()).requires_grad_()
    codebook_t = torch.from_numpy(codebook.copy()).requires_grad_()
    losses, _, _ = torch_forward(w_t, codebook_t, torch.from_numpy(x), cfg, estimator)
    sum(losses.values()).backward()
    return {k: float(v.detach()) for k, v in losses.items()}, w_t.grad.numpy(), codebook_t.grad.numpy()


def rotation_grads(w, codebook, x, cfg):
    return autograd_grads(w, codebook, x, cfg, estimator="rotation")


GRADIENTS: dict[str, Callable] = {"autograd_ste": autograd_grads, "manual_ste": manual_grads,
                                  "rotation": rotation_grads}
METHODS = ("pca_lloyd",) + tuple(GRADIENTS)
LABELS = {"pca_lloyd": "PCA + Lloyd-Max", "autograd_ste": "autograd STE", "manual_ste": "manual STE (NumPy)",
          "rotation": "rotation estimator"}


# ---------------------------------------------------------------------------------------------
# Metrics and bounds
# ---------------------------------------------------------------------------------------------


def evaluate(w: np.ndarray, codebook: np.ndarray, x: np.ndarray, basis: np.ndarray) -> dict:
    """Test metrics: mse = mean ‖x − W_e·c_k‖²; usage entropy (nats) of the histogram of all codes, its
    ratio to log K, dead codes (never chosen); subspace_gap = 1 − ‖Aᵀ·W_e‖²_F / m, the mean squared
    sine of the principal angles between the learned and the planted subspace (0: the same)."""
    K = len(codebook)
    idx = nearest(x @ w, codebook)
    mse = float(((codebook[idx] @ w.T - x) ** 2).sum(1).mean())
    codes = vqvae.codebook_metrics(torch.from_numpy(np.bincount(idx, minlength=K)))
    entropy = math.log(codes["perplexity"])
    gap = float(1 - ((basis.T @ w) ** 2).sum() / w.shape[1])
    return {"mse": mse, "entropy": entropy, "entropy_ratio": entropy / math.log(K) if K > 1 else 1.0,
            "dead_codes": codes["dead_codes"], "subspace_gap": gap}


def gaussian_rd_bound(variances, rate_nats: float) -> float:
    """Shannon's distortion–rate function of a Gaussian vector with independent components of these
    variances, at `rate_nats`, by reverse water-filling: D = Σ min(θ, v_i) with Σ max(0, ½ ln(v_i/θ)) = R.
    A quantizer with K codes has rate ≤ ln K, so no method can reach a test MSE below D(ln K)."""
    v = np.asarray(variances, dtype=np.float64)
    lo, hi = math.log(v.max()) - 2 * rate_nats, math.log(v.max())                # log θ bracket
    for _ in range(200):
        mid = (lo + hi) / 2
        rate = np.maximum(0.0, 0.5 * (np.log(v[v > 0]) - mid)).sum()
        lo, hi = (mid, hi) if rate > rate_nats else (lo, mid)
    return float(np.minimum(math.exp((lo + hi) / 2), v).sum())


def data_variances(cfg: LinearConfig) -> np.ndarray:
    """Eigenvalues (D,) of the data covariance A·diag(λ)·Aᵀ + σ²·I."""
    noise_only = np.full(cfg.data_dim - cfg.latent_dim, cfg.noise_var)
    return np.concatenate([latent_variances(cfg) + cfg.noise_var, noise_only])


def references(cfg: LinearConfig) -> dict:
    """Test-MSE reference points: rd_bound, the least any K-code quantizer can reach on this data, and
    subspace_floor = (D − m)·σ², what the planted subspace misses with no quantization at all."""
    return {"rd_bound": gaussian_rd_bound(data_variances(cfg), math.log(cfg.codebook_size)),
            "subspace_floor": (cfg.data_dim - cfg.latent_dim) * cfg.noise_var}


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------


def pca_lloyd(cfg: LinearConfig, data: dict, seed: int) -> dict:
    """PCA + Lloyd-Max: W_e = the top-m eigenvectors of the second-moment matrix XᵀX/n (the model has no
    bias, and the data has mean zero), then k-means++ and Lloyd on all training projections."""
    rng = np.random.default_rng([seed, 1])
    x = data["x_train"]
    _, eigvecs = np.linalg.eigh(x.T @ x / len(x))                                        # ascending
    w = eigvecs[:, ::-1][:, :cfg.latent_dim].copy()
    z = x @ w
    codebook = lloyd(z, kmeans_pp(z, cfg.codebook_size, rng), cfg.lloyd_iters)
    return {"w": w, "codebook": codebook, "final": evaluate(w, codebook, data["x_test"], data["basis"])}


def fit(method: str, cfg: LinearConfig, data: dict, seed: int, steps: Optional[int] = None,
        eval_every: int = 0, on_step: Optional[Callable] = None) -> dict:
    """One run of `method` from seed: {'w', 'codebook', 'final': test metrics, 'curve': [test metrics
    with 'step'] every eval_every steps (and at 0), 'losses': training losses of the last step}.
    Gradient methods start from a random orthonormal W_e and a k-means++ codebook on the first batch's
    projections; the same seed gives every method the same start and the same batches.
    on_step(step, w, codebook, x_batch, grad_w, grad_codebook) sees each step's gradients before the update
    (verify uses it)."""
    if method == "pca_lloyd":
        return pca_lloyd(cfg, data, seed)
    grads = GRADIENTS[method]
    steps = cfg.steps if steps is None else steps
    rng = np.random.default_rng([seed, 1])  # data, init and batch order draw from separate streams
    x_train, x_test, basis = data["x_train"], data["x_test"], data["basis"]
    batches = batch_order(len(x_train), cfg.batch_size, seed)
    first = next(batches)
    w = random_stiefel(cfg.data_dim, cfg.latent_dim, rng).astype(x_train.dtype)
    codebook = kmeans_pp(x_train[first] @ w, cfg.codebook_size, rng)
    curve = [{"step": 0, **evaluate(w, codebook, x_test, basis)}] if eval_every else []
    losses, idx = {}, first
    for step in range(1, steps + 1):
        x = x_train[idx]
        losses, grad_w, grad_codebook = grads(w, codebook, x, cfg)
        if on_step is not None:
            on_step(step, w, codebook, x, grad_w, grad_codebook)
        w = retract(w - cfg.lr_encoder * grad_w)
        codebook = codebook - cfg.lr_codebook * grad_codebook
        if eval_every and step % eval_every == 0:
            curve.append({"step": step, **evaluate(w, codebook, x_test, basis)})
        idx = next(batches)
    return {"w": w, "codebook": codebook, "final": evaluate(w, codebook, x_test, basis), "curve": curve,
            "losses": losses}


def mean_std(values) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": len(a)}


def strip_step(point: dict) -> dict:
    return {k: v for k, v in point.items() if k != "step"}


def summarize_runs(finals: list) -> dict:
    """{metric: mean/std over seeds} of a list of final-metric dicts."""
    return {key: mean_std([f[key] for f in finals]) for key in finals[0]}


# ---------------------------------------------------------------------------------------------
# Experiments: each returns a JSON-able dict and draws its figure
# ---------------------------------------------------------------------------------------------

# the config key each sweep experiment varies, and its values
SWEEPS = {"kscale": ("codebook_size", (8, 16, 32, 64)),
          "commitment": ("commitment_weight", (0.0, 0.1, 0.25, 0.5, 1.0))}


def relative_gap(a: np.ndarray, b: np.ndarray) -> float:
    """max |a − b| / max |b|: the size of a difference relative to the quantity."""
    scale = np.abs(b).max()
    return float(np.abs(a - b).max() / scale) if scale > 0 else float(np.abs(a - b).max())


def verify(cfg: LinearConfig, seeds) -> dict:
    """Autograd STE against manual STE from the same start on the same batches, test metrics every step.
    Also, at every step of the manual run, autograd's gradient at the same point: a check of the hand
    derivation that does not depend on the two trajectories staying together."""
    data, per_seed, steps = make_data(cfg), [], cfg.verify_steps
    for seed in seeds:
        grad_gaps = []

        def compare(step, w, codebook, x, gw_m, gc_m):  # the manual run's gradients against autograd's
            _, gw_a, gc_a = autograd_grads(w, codebook, x, cfg)
            grad_gaps.append(max(relative_gap(gw_a, gw_m), relative_gap(gc_a, gc_m)))

        auto = fit("autograd_ste", cfg, data, seed, steps, eval_every=1)
        manual = fit("manual_ste", cfg, data, seed, steps, eval_every=1, on_step=compare)
        curves = {name: {key: [p[key] for p in run["curve"]] for key in ("mse", "entropy")}
                  for name, run in (("autograd_ste", auto), ("manual_ste", manual))}
        a, m = (np.array(curves[n]["mse"]) for n in ("autograd_ste", "manual_ste"))
        ea, em = (np.array(curves[n]["entropy"]) for n in ("autograd_ste", "manual_ste"))
        per_seed.append({"seed": seed, "curves": curves,
                         "mse_rel_diff": (np.abs(a - m) / m).tolist(),
                         "entropy_rel_diff": (np.abs(ea - em) / em).tolist(),
                         "grad_rel_diff": grad_gaps,
                         "final": {"autograd_ste": auto["final"], "manual_ste": manual["final"]}})
    summary = {"max_mse_rel_diff": max(max(s["mse_rel_diff"]) for s in per_seed),
               "final_mse_rel_diff": max(s["mse_rel_diff"][-1] for s in per_seed),
               "max_entropy_rel_diff": max(max(s["entropy_rel_diff"]) for s in per_seed),
               "max_grad_rel_diff": max(max(s["grad_rel_diff"]) for s in per_seed)}
    return {"steps": steps, "per_seed": per_seed, "summary": summary}


def convergence(cfg: LinearConfig, seeds) -> dict:
    """All four methods over cfg.convergence_steps SGD steps, test metrics every cfg.eval_every steps; the
    table holds the state at cfg.steps (the defaults) and at the end."""
    data, runs, steps = make_data(cfg), {}, cfg.convergence_steps
    for method in METHODS:
        runs[method] = [fit(method, cfg, data, seed, steps, eval_every=cfg.eval_every) for seed in seeds]
    # the table's first column: the last evaluated step at or before cfg.steps
    early = max(p["step"] for p in runs[METHODS[1]][0]["curve"] if p["step"] <= cfg.steps)
    table = {"pca_lloyd": {"final": summarize_runs([r["final"] for r in runs["pca_lloyd"]])}}
    for method in GRADIENTS:
        table[method] = {f"step_{early}": summarize_runs([strip_step(p) for r in runs[method] for p in r["curve"]
                                                          if p["step"] == early]),
                         "final": summarize_runs([r["final"] for r in runs[method]])}
    curves = {method: [r["curve"] for r in runs[method]] for method in GRADIENTS}
    return {"steps": steps, "table": table, "curves": curves, "references": references(cfg)}


def sweep_configs(name: str, cfg: LinearConfig) -> list:
    """[(value, config)] of sweep experiment `name`, each checked (so bad values stop before any work)."""
    key, values = SWEEPS[name]
    configs = []
    for value in values:
        try:
            configs.append((value, validate(dataclasses.replace(cfg, **{key: value}))))
        except VQVAEError as e:
            raise VQVAEError(f"{name} with {key} = {value}: {e}") from None
    return configs


def sweep(name: str, cfg: LinearConfig, seeds, methods) -> dict:
    """{value: {method: mean/std of the final metrics over seeds}} for each config of the sweep,
    plus the reference points of each."""
    data, rows = make_data(cfg), {}
    key, values = SWEEPS[name]
    for value, run_cfg in sweep_configs(name, cfg):
        rows[str(value)] = {method: summarize_runs([fit(method, run_cfg, data, seed)["final"] for seed in seeds])
                            for method in methods}
        rows[str(value)]["references"] = references(run_cfg)
    return {"key": key, "values": list(values), "rows": rows}


def kscale(cfg: LinearConfig, seeds) -> dict:
    return sweep("kscale", cfg, seeds, METHODS)


def commitment(cfg: LinearConfig, seeds) -> dict:
    """The commitment weight β; PCA + Lloyd-Max has no β and is run once as the reference; manual STE is
    autograd STE's twin (verify) and is left out."""
    result = sweep("commitment", cfg, seeds, ("autograd_ste", "rotation"))
    data = make_data(cfg)
    result["pca_lloyd"] = summarize_runs([pca_lloyd(cfg, data, seed)["final"] for seed in seeds])
    return result


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------

COLORS = {"pca_lloyd": "black", "autograd_ste": "tab:blue", "manual_ste": "tab:orange", "rotation": "tab:green"}
FLOOR = 1e-17  # a difference of exactly 0 is drawn here on the log axes


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_verify(result: dict, cfg: LinearConfig):
    plt = _pyplot()
    run = result["per_seed"][0]
    steps = np.arange(len(run["mse_rel_diff"]))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, style in (("autograd_ste", "-"), ("manual_ste", "--")):
        axes[0].plot(steps, run["curves"][name]["mse"], style, color=COLORS[name], label=LABELS[name])
        axes[1].plot(steps, np.array(run["curves"][name]["entropy"]) / math.log(cfg.codebook_size), style,
                     color=COLORS[name], label=LABELS[name])
    axes[0].set(xlabel="step", ylabel="test MSE  E‖x − x̂‖²", title=f"test MSE (seed {run['seed']})")
    axes[1].set(xlabel="step", ylabel="usage entropy / log K", title="code usage entropy")
    for key, label in (("mse_rel_diff", "test MSE"), ("entropy_rel_diff", "usage entropy")):
        axes[2].plot(steps, np.maximum(run[key], FLOOR), label=f"{label}: |auto − manual| / manual")
    axes[2].plot(steps[1:], np.maximum(run["grad_rel_diff"], FLOOR), label="gradient at the same point")
    axes[2].set(xlabel="step", yscale="log", title=f"relative difference ({cfg.dtype}; 0 drawn at {FLOOR:g})")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return fig


def plot_convergence(result: dict, cfg: LinearConfig):
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for method, runs in result["curves"].items():
        steps = [p["step"] for p in runs[0]]
        for ax, key in zip(axes, ("mse", "entropy_ratio")):
            values = np.array([[p[key] for p in run] for run in runs])                # (seeds, points)
            ax.plot(steps, values.mean(0), "--" if method == "manual_ste" else "-", color=COLORS[method],
                    label=LABELS[method])
            ax.fill_between(steps, values.min(0), values.max(0), color=COLORS[method], alpha=0.2)
    pca = result["table"]["pca_lloyd"]["final"]
    for ax, key in zip(axes, ("mse", "entropy_ratio")):
        ax.axhline(pca[key]["mean"], color=COLORS["pca_lloyd"], ls=":", label=LABELS["pca_lloyd"])
        ax.grid(alpha=0.3)
    axes[0].axhline(result["references"]["rd_bound"], color="gray", ls="-.", label="rate–distortion bound D(ln K)")
    axes[0].set(xlabel="step", ylabel="test MSE  E‖x − x̂‖²",
                ylim=(0.95 * result["references"]["rd_bound"], 1.6 * pca["mse"]["mean"]),
                title=f"convergence, K={cfg.codebook_size} (mean; band: min–max over seeds; axis cut)")
    axes[1].set(xlabel="step", ylabel="usage entropy / log K", title="code usage entropy")
    axes[0].legend(fontsize=8)
    return fig


def plot_sweep(result: dict, xlabel: str, log_x: bool, reference_method: Optional[str] = None):
    plt = _pyplot()
    values = result["values"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    methods = [m for m in result["rows"][str(values[0])] if m != "references"]
    for method in methods:
        for ax, key in zip(axes, ("mse", "entropy_ratio")):
            mean = [result["rows"][str(v)][method][key]["mean"] for v in values]
            std = [result["rows"][str(v)][method][key]["std"] for v in values]
            ax.errorbar(values, mean, yerr=std, marker="o", capsize=3, color=COLORS[method], label=LABELS[method])
    if reference_method:
        for ax, key in zip(axes, ("mse", "entropy_ratio")):
            ax.axhline(result[reference_method][key]["mean"], color=COLORS[reference_method], ls=":",
                       label=LABELS[reference_method])
    else:
        axes[0].plot(values, [result["rows"][str(v)]["references"]["rd_bound"] for v in values], "-.",
                     color="gray", label="rate–distortion bound D(ln K)")
    for ax in axes:
        ax.set(xlabel=xlabel)
        ax.grid(alpha=0.3)
        if log_x:
            ax.set_xscale("log", base=2)
    axes[0].set(ylabel="test MSE  E‖x − x̂‖²", title="test MSE (mean ± std over seeds)")
    axes[1].set(ylabel="usage entropy / log K", title="code usage entropy")
    axes[0].legend(fontsize=8)
    return fig


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

EXPERIMENTS = {
    "verify": (verify, plot_verify),
    "convergence": (convergence, plot_convergence),
    "kscale": (kscale, lambda r, cfg: plot_sweep(r, "codebook size K", log_x=True)),
    "commitment": (commitment, lambda r, cfg: plot_sweep(r, "commitment weight β", log_x=False,
                                                         reference_method="pca_lloyd")),
}


def to_json(obj):
    """Numbers and containers as JSON takes them (NumPy scalars and arrays included)."""
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def run_experiment(name: str, cfg: LinearConfig, seeds, out: Path) -> dict:
    """Run one experiment and write <out>/<name>.json and <out>/<name>.png."""
    experiment, plot = EXPERIMENTS[name]
    start = time.perf_counter()
    result = experiment(cfg, seeds)
    elapsed = time.perf_counter() - start
    record = {"experiment": name, "config": dataclasses.asdict(cfg), "seeds": list(seeds),
              "seconds": round(elapsed, 2), "torch": torch.__version__, "numpy": np.__version__, **result}
    vqvae.atomic_write_bytes(out / f"{name}.json", json.dumps(to_json(record), separators=(",", ":")).encode())
    fig = plot(result, cfg)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    vqvae.atomic_write_bytes(out / f"{name}.png", buffer.getvalue())
    print(f"{name}: {headline(name, result)}  ({elapsed:.1f} s) → {out / name}.json, .png")
    return record


def headline(name: str, result: dict) -> str:
    """One line of the experiment's main figures, for the terminal."""
    if name == "verify":
        s = result["summary"]
        return (f"autograd vs manual STE: test MSE differs by at most {s['max_mse_rel_diff']:.2e} (relative), "
                f"gradients by {s['max_grad_rel_diff']:.2e}")
    if name == "convergence":
        return ", ".join(f"{m} {t['final']['mse']['mean']:.4f}" for m, t in result["table"].items())
    return "; ".join(f"{result['key']}={v}: " + ", ".join(f"{m} {r['mse']['mean']:.4f}" for m, r in row.items()
                                                          if m != "references")
                     for v, row in result["rows"].items())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Linear-encoder VQ study: PCA + Lloyd-Max vs autograd STE vs "
                                     "hand-derived NumPy STE vs the rotation estimator.", allow_abbrev=False)
    parser.add_argument("experiment", choices=tuple(EXPERIMENTS) + ("all",), help="which experiment to run")
    parser.add_argument("--out", required=True, help="directory for <experiment>.json and <experiment>.png")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N−1 per configuration (default: 5)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing result files in --out")
    types = {"int": int, "float": float, "str": str}
    for f in dataclasses.fields(LinearConfig):
        parser.add_argument(f"--{f.name}", type=types[str(f.type)], metavar=f.name.upper(),
                            help=f"{f.metadata['help']} (default: {f.default})")
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = vqvae.parse_flags(build_parser(), argv, "linear_vq.py")
        if args.seeds < 1:
            raise VQVAEError(f"--seeds must be ≥ 1, got {args.seeds}")
        cfg = validate(LinearConfig(**{k: getattr(args, k) for k in CONFIG_KEYS if getattr(args, k) is not None}))
        names = list(EXPERIMENTS) if args.experiment == "all" else [args.experiment]
        for name in names:
            if name in SWEEPS:
                sweep_configs(name, cfg)
        out = Path(args.out)
        existing = [out / f"{n}.{ext}" for n in names for ext in ("json", "png") if (out / f"{n}.{ext}").exists()]
        if existing and not args.overwrite:
            raise VQVAEError(f"{existing[0]} exists; pass --overwrite to replace it, or choose another --out")
        out.mkdir(parents=True, exist_ok=True)
        for name in names:
            run_experiment(name, cfg, range(args.seeds), out)
    except VQVAEError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
