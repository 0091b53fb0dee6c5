"""VQ-VAE on CIFAR-10 with three quantizers behind one contract: VQ-EMA, a Blahut–Arimoto (BA) soft
quantizer, and FSQ. Read top to bottom: helpers → config → data → encoder/decoder → quantizers →
model → metrics → checkpoints → evaluate/train. Importing it runs nothing; `train(cfg)` does the work,
and `train.py` is the command line around it. Shapes: B batch, D code dimension, H×W latent grid
(8×8 for 32×32 images), N = B·H·W latent vectors, K number of codes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import hashlib
import inspect
import io
import json
import math
import os
import platform
import random
import re
import shlex
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import yaml

from wandb_log import NoWandb, start_wandb

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


class VQVAEError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""

    exit_code = 2


class RunStopped(VQVAEError):
    """A run stopped on purpose (a signal, a non-finite value) after keeping its last good checkpoint."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def nearest_name(name: str, choices) -> str:
    """' (did you mean X?)' for the closest valid name, or '' when nothing is close."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def parse_flags(parser, argv, program: str):
    """parser.parse_known_args(argv)'s namespace; an unknown option is a VQVAEError naming the nearest flag."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flags = [o[2:] for o in parser._option_string_actions if o.startswith("--")]
        word = unknown[0]
        name = word[2:].split("=")[0] if word.startswith("--") else word
        hint = nearest_name(name, flags).replace("'", "'--", 1) if word.startswith("--") else ""
        raise VQVAEError(f"unknown option '{word}'{hint}; see python {program} --help")
    return args


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)  # validate() already checked the spelling
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}.get(device.type)
    if available and not available():
        raise VQVAEError(f"device '{name}' asked for, but {device.type.upper()} is not available here; use --device auto or cpu")
    return device


def device_caveats(cfg, device: torch.device, mac_version: str = "") -> list[str]:
    """Before any work: raises for what cfg cannot do on the device, returns warnings for what runs there
    without PyTorch's promise (docs/devices.md). mac_version: platform.mac_ver()[0], empty off macOS."""
    if device.type != "mps":
        return []
    if cfg.precision == "bf16" and int(mac_version.split(".")[0] if mac_version[:1].isdigit() else 0) < 14:
        raise VQVAEError(f"precision bf16 on MPS needs macOS 14 or later (this is macOS {mac_version or '?'}); "
                         f"use --precision fp32")
    notes = {"compile": "compile on MPS: PyTorch's MPS compiler is a prototype (pytorch/pytorch#150121); if the "
                        "first step fails, run without --compile",
             "deterministic": "deterministic on MPS: PyTorch promises no deterministic MPS kernels, so a resumed run "
                              "continues the same data order and random streams but may not repeat the bits"}
    return [text for key, text in notes.items() if getattr(cfg, key)]


def sync(device: torch.device) -> None:
    """Wait for queued device work, so wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# glibc's malloc hands freed memory back to the kernel (mmap'd blocks, and the top of its heap beyond
# twice the largest mmap'd block freed so far), so a training step's tensors of a few MiB are new
# pages every step, each one faulted in and zeroed by the kernel: about 10,000 page faults a step
# of the small model at K = 512, which made it 1.25× slower on a 2-core virtual machine
# (bench/page_faults.py). Blocks up to KEPT_BLOCK_BYTES come from the heap and up to KEPT_FREE_BYTES of
# freed memory stay with the process; peak memory is unchanged.
KEPT_BLOCK_BYTES = 64 * 2**20
KEPT_FREE_BYTES = 2**30


def glibc_malloc() -> bool:
    """Whether this process allocates through glibc's malloc under Linux, the one keep_freed_memory tunes."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for the next step (mallopt M_MMAP_THRESHOLD and
    M_TRIM_THRESHOLD, process-wide); whether it did: False off Linux or with another C library."""
    if not glibc_malloc():
        return False
    import ctypes

    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(libc.mallopt(m_mmap_threshold, KEPT_BLOCK_BYTES) and libc.mallopt(m_trim_threshold, KEPT_FREE_BYTES))


HOST_MATH = [0]  # > 0 inside host_math()


@contextlib.contextmanager
def host_math():
    """Marks arithmetic that runs on the CPU whatever the training device: the float64 sums of the
    metrics and linear algebra that Apple's MPS lacks (it has no float64 at all). Work inside it on
    .cpu() copies; tests/test_devices.py runs training under a check that refuses float64 anywhere else."""
    HOST_MATH[0] += 1
    try:
        yield
    finally:
        HOST_MATH[0] -= 1


def generator_for(device: torch.device, seed: int) -> torch.Generator:
    """A seeded generator for the random draws made for `device`: on the device itself (CPU, CUDA), or
    on the CPU for MPS, whose device generators PyTorch does not fully support (pytorch/pytorch#110820)
    and whose randperm is not uniform (#104315). Draws are made on generator.device, then moved."""
    return torch.Generator(device="cpu" if device.type == "mps" else device).manual_seed(seed)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, rename over `path`: a crash leaves the old file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


# Data-parallel training (torchrun): every process runs the same code on its shard of each global
# batch; the helpers below are no-ops in a single process. Every process makes the same collective
# calls in the same order: none sits behind a rank-dependent branch.


def world() -> tuple[int, int]:
    """(rank, number of processes) of this process; (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or max) t across processes, in place; returns t."""
    if world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


def all_reduce_host_(t: torch.Tensor) -> torch.Tensor:
    """all_reduce_ of a CPU tensor (float64 sums): under NCCL, which reduces CUDA tensors only, via the GPU."""
    if world()[1] > 1 and dist.get_backend() == "nccl":
        return t.copy_(all_reduce_(t.cuda()).cpu())
    return all_reduce_(t)


def all_reduce_logsumexp_(log_x: torch.Tensor) -> torch.Tensor:
    """log Σ_processes exp(log_x), in place and shift-stabilised: log-domain sums stay in the log domain."""
    if world()[1] > 1:
        shift = all_reduce_(log_x.clone(), "max")
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
        log_x.copy_(all_reduce_((log_x - shift).exp()).log() + shift)
    return log_x


def broadcast_(t: torch.Tensor) -> torch.Tensor:
    """rank 0's t on every process, in place."""
    if world()[1] > 1:
        dist.broadcast(t, src=0)
    return t


def flatten_latents(z_e: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W) → (N, D) with N = B·H·W, one row per latent vector."""
    return z_e.permute(0, 2, 3, 1).reshape(-1, z_e.shape[1])


def unflatten_latents(z: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N, D) → (B, D, H, W) shaped like `like`."""
    B, D, H, W = like.shape
    return z.view(B, H, W, D).permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------
# Config: every default lives here, once. YAML overrides it, command-line flags override YAML.
# ---------------------------------------------------------------------------------------------


def _opt(default, help: str, group: str = ""):
    meta = {"help": help, "group": group}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


CHOICES = {
    "arch": ("small", "resnet", "sonnet"),
    "dataset": ("cifar10", "folder", "synthetic"),
    "precision": ("fp32", "bf16"),
    "codebook_init": ("kmeans", "uniform", "kmeans_val"),
    "ba_prior": ("uniform", "running"),
    "ba_reseed_prior": ("keep", "uniform"),
    "ba_codebook_update": ("grad", "ema", "grad_ema"),
    "ba_eval": ("prior", "batch"),
    "ba_output": ("soft", "hard_soft_grad", "hard_ste"),
    "beta_units": ("absolute", "relative", "critical"),
    "latent_norm": ("none", "l2"),
    "grad_estimator": ("ste", "rotation"),
    "augment": ("none", "crop_flip"),
    "pixel_range": ("signed", "unit"),
}
# Earlier names of values, still read from saved configs and sweep files.
VALUE_ALIASES = {"ba_output": {"hard": "hard_soft_grad", "ste": "hard_ste"}}
# Keys that no longer exist, with the one value they may still hold in a saved config: the
# behaviour the code now always has. Any other value is refused.
RETIRED_KEYS = {"beta_schedule": "step", "ba_prior_decay": 0.99, "ema_eps": 1e-5}

# Architecture presets: values for n_hid / latent_dim when the config leaves them empty.
ARCH_PRESETS = {
    "small": {"n_hid": 64, "latent_dim": 64},
    "resnet": {"n_hid": 128, "latent_dim": 256},
    "sonnet": {"n_hid": 64, "latent_dim": 64},
}
# Quantizer name → class; each class registers itself below (@register) and declares the keys it
# reads (its `options`) and checks them (its `check`).
QUANTIZERS: dict = {}


@dataclass
class Config:
    name: str = _opt("", "experiment name: results go to <out_dir>/<name>/ (empty: <quantizer>_K<K>_<arch>_<time>)", "experiment")
    out_dir: str = _opt("experiments", "parent directory of experiment directories", "experiment")
    seed: int = _opt(1337, "seed for initialisation and data order", "experiment")
    device: str = _opt("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps", "experiment")
    precision: str = _opt("fp32", "fp32 or bf16 (autocast for encoder/decoder; quantizer math stays fp32)", "experiment")
    dataset: str = _opt("cifar10", "cifar10 (torchvision, downloads), folder (train/ and test/ image folders) or synthetic", "data")
    data_dir: str = _opt("data", "where cifar10 is downloaded to or found, or the image folder's root", "data")
    synthetic_size: int = _opt(4096, "synthetic dataset: number of training images (test set: a quarter of it)", "data")
    pixel_range: str = _opt("signed", "images as the model sees them: signed ([−1, 1]) or unit ([0, 1], the published study's)", "data")
    augment: str = _opt("none", "none, or crop_flip (random crop of the 4-pixel reflect-padded image, random flip)", "data")
    arch: str = _opt("small", "encoder/decoder: small (≈215k parameters), resnet (wide, residual) or sonnet (the published "
                              "BA study's: DeepMind's sonnet VQ-VAE example, ≈667k)", "model")
    n_hid: Optional[int] = _opt(None, "hidden channels of the first conv (empty: 64 for small, 128 for resnet)", "model")
    latent_dim: Optional[int] = _opt(None, "code dimension D (empty: 64 for small, 256 for resnet)", "model")
    latent_norm: str = _opt("none", "none, or l2: each encoder output vector scaled to unit length", "model")
    quantizer: str = _opt("vq_ema", "vq_ema (nearest code, EMA codebook), ba_vq (Blahut–Arimoto) or fsq (no codebook)", "quantizer")
    codebook_size: int = _opt(512, "number of codes K", "codebook (vq_ema, ba_vq)")
    commitment_weight: float = _opt(0.25, "weight of ‖z_e − sg(z_q)‖² (0 reproduces the published BA code)", "codebook (vq_ema, ba_vq)")
    codebook_init: str = _opt("kmeans", "kmeans (on encoder outputs of training images), uniform (±1/K), or kmeans_val "
                                        "(published recipe: on the first validation batch)", "codebook (vq_ema, ba_vq)")
    kmeans_iters: int = _opt(10, "Lloyd iterations after k-means++ seeding", "codebook (vq_ema, ba_vq)")
    ema_decay: float = _opt(0.99, "decay of an EMA codebook's statistics", "codebook (vq_ema, ba_vq)")
    dead_code_threshold: float = _opt(0.0, "re-seed codes whose EMA usage (assignments per batch) falls below this from the "
                                           "batch's encoder outputs (0: off)", "codebook (vq_ema, ba_vq)")
    grad_estimator: str = _opt("ste", "ste (straight-through copy) or rotation (rotation trick, Fifty et al. 2024)", "vq_ema")
    beta_start: float = _opt(0.5, "inverse temperature β at the first step; a cosine schedule takes it to beta_end", "ba_vq")
    beta_end: float = _opt(3.0, "β at the last step (β_end < β_start anneals in reverse)", "ba_vq")
    beta_units: str = _opt("absolute", "what β multiplies: absolute (‖e − c‖²), relative (‖e − c‖² / σ, σ the running mean "
                                       "distance to the code) or critical (σ = 2·λ_max of the latents: β = 1 the first "
                                       "critical point)", "ba_vq")
    ba_iters: int = _opt(1, "Blahut–Arimoto E/M iterations per forward pass", "ba_vq")
    ba_prior: str = _opt("uniform", "Q each forward starts from: uniform (1/K) or running (EMA of batch marginals: the rate term)", "ba_vq")
    ba_reseed_prior: str = _opt("keep", "a re-seeded code's running-prior share: keep (as decayed) or uniform (1/K)", "ba_vq")
    entropy_weight: float = _opt(0.01, "weight of −H(Q), rewarding a spread-out code marginal", "ba_vq")
    codebook_weight: float = _opt(1.0, "weight of ‖sg(z_e) − z_q‖² (codes moved by gradient; 0 reproduces the published code)", "ba_vq")
    ba_codebook_update: str = _opt("grad", "codes move by gradient (grad), by an EMA of p-weighted encoder outputs (ema), or "
                                           "both (grad_ema, published recipe)", "ba_vq")
    ba_output: str = _opt("hard_soft_grad", "decoder input: hard_soft_grad (argmax code, gradient of Σ p·c), soft (Σ p·c) or "
                                            "hard_ste (argmax code, straight-through gradient)", "ba_vq")
    ba_fast_path: bool = _opt(True, "BAEStep and a nearest-code evaluation; false: straight from ba_logits (after editing it)", "ba_vq")
    ba_grad_through_iters: bool = _opt(False, "backpropagate through every E/M iteration, not only the last", "ba_vq: published recipe")
    ba_eval: str = _opt("prior", "code at evaluation: prior (argmax log Q − β·d, Q the prior) or batch (after E/M iterations on "
                                 "each validation batch)", "ba_vq: published recipe")
    fsq_levels: list[int] = _opt([8, 5, 5, 5], "levels per channel: 8,5,5,5 gives K = 1,000, 8,8,8,6,5 K = 15,360", "fsq")
    epochs: int = _opt(10, "training epochs", "training")
    max_steps: int = _opt(0, "stop after this many optimizer steps (0: no limit); β's schedule spans the shortened run", "training")
    batch_size: int = _opt(128, "training batch size; under torchrun the global batch, split evenly among the processes", "training")
    eval_batch_size: int = _opt(128, "validation batch, the one of the published-convention (_batch) metrics", "training")
    lr: float = _opt(3e-4, "AdamW learning rate", "training")
    weight_decay: float = _opt(1e-4, "AdamW weight decay", "training")
    log_every: int = _opt(50, "log batch metrics every N steps (the only steps that read values back from the device)", "training")
    checkpoint_freq: int = _opt(1, "write checkpoint_epoch<N>.pt, a full resumable checkpoint, every N epochs (0: only last.pt)", "training")
    save_every_steps: int = _opt(0, "also write last.pt every N optimizer steps (0: only at the end of each epoch)", "training")
    detect_anomaly: bool = _opt(False, "autograd anomaly detection, to find the operation that made a NaN (slow)", "training")
    channels_last: bool = _opt(True, "NHWC memory layout for the convolutions (same results, faster on most devices)", "training")
    compile: bool = _opt(False, "torch.compile the encoder and decoder (slow first steps, faster after)", "training")
    deterministic: bool = _opt(False, "deterministic kernels only: CUDA runs repeat their bits (CPU runs do anyway)", "training")
    wandb: bool = _opt(True, "log to Weights & Biases when it is installed (falls back to offline, never blocks)", "logging")
    wandb_project: str = _opt("bavq", "W&B project name", "logging")
    wandb_group: str = _opt("", "W&B run group (a sweep sets it to the study's name)", "logging")


CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(Config))
DEFAULTS = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            for f in dataclasses.fields(Config)}
# The one list of keys that do not change a run's results: where it writes, how fast, how it logs.
# Every other key does: a sweep does not count a finished run made with another value as that run,
# and --resume refuses to change one, except the run's length (epochs, max_steps), which it may extend.
RUNTIME_KEYS = ("name", "out_dir", "device", "data_dir", "log_every", "checkpoint_freq", "save_every_steps",
                "detect_anomaly", "channels_last", "compile", "deterministic", "wandb", "wandb_project", "wandb_group")
LENGTH_KEYS = ("epochs", "max_steps")


def _field_type(f: dataclasses.Field):
    """(base type, optional?) of a Config field; annotations are strings under `from __future__`."""
    text = str(f.type)
    optional = text.startswith("Optional[")
    base = text[len("Optional["):-1] if optional else text
    return {"int": int, "float": float, "str": str, "bool": bool, "list[int]": list}[base], optional


def _coerce(key: str, value, where: str):
    """Turn a YAML or command-line value into the field's type, or raise a one-line error."""
    f = Config.__dataclass_fields__[key]
    kind, optional = _field_type(f)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        if kind is str and value is not None:
            return value
        raise VQVAEError(f"{key}: a value is required ({where})")
    if isinstance(value, dict):
        raise VQVAEError(f"{key}: holds a mapping ({where}), but config keys are flat: write the keys inside it at "
                         f"the top level (e.g. 'arch: small', not 'model: {{arch: small}}')")
    try:
        if kind is list:  # a YAML list, or "8,5,5,5" / "[8, 5, 5, 5]" from the command line
            items = value if isinstance(value, list) else str(value).strip("[] ").split(",")
            if not items or any(isinstance(v, (bool, float)) for v in items):
                raise ValueError
            return [int(str(v).strip()) for v in items]
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
                return value.lower() in ("true", "yes", "1")
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)  # also takes YAML's '3e-4', which PyYAML reads as a string
        if isinstance(value, list):
            raise ValueError
        return VALUE_ALIASES.get(key, {}).get(str(value), str(value))
    except (TypeError, ValueError):
        kind_name = "a list of integers" if kind is list else kind.__name__
        raise VQVAEError(f"{key}: expected {kind_name}, got {value!r} ({where})") from None


def read_yaml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise VQVAEError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise VQVAEError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise VQVAEError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    return data


def apply_overrides(cfg: Config, values: dict, where: str) -> Config:
    """cfg with `values` set; an unknown key names the nearest valid one; retired keys at their value drop."""
    values = dict(values)
    for key in list(values):
        if key in RETIRED_KEYS and values[key] == RETIRED_KEYS[key]:
            del values[key]
        elif key in RETIRED_KEYS:
            raise VQVAEError(f"{key} {values[key]!r} ({where}): this version no longer has {key}; it always "
                             f"behaves as {key} {RETIRED_KEYS[key]!r}")
        elif key not in CONFIG_KEYS:
            hint = nearest_name(key, CONFIG_KEYS)
            if isinstance(values[key], dict):
                hint += "; config keys are flat: write the keys inside it at the top level"
            raise VQVAEError(f"unknown config key '{key}' in {where}{hint}")
    return dataclasses.replace(cfg, **{k: _coerce(k, v, where) for k, v in values.items()})


def quantizer_keys() -> set:
    """Every key that some quantizer declares as its own option."""
    return {key for cls in QUANTIZERS.values() for key in cls.options}


def applicable(values: dict, quantizer: str) -> dict:
    """values less the options of quantizers other than `quantizer` (how a sweep base and saved configs are read)."""
    own = QUANTIZERS[quantizer].options if quantizer in QUANTIZERS else ()
    return {k: v for k, v in values.items() if k not in quantizer_keys() or k in own}


def validate(cfg: Config) -> Config:
    """Reject invalid values with one clear line, before any work; fill in the arch presets. The chosen
    quantizer's class checks its options; another quantizer's option is refused unless at its default."""
    if cfg.quantizer not in QUANTIZERS:
        raise VQVAEError(f"quantizer: unknown value '{cfg.quantizer}'{nearest_name(cfg.quantizer, QUANTIZERS)}; "
                         f"choose from {', '.join(QUANTIZERS)}")
    own = QUANTIZERS[cfg.quantizer].options
    for key in sorted(quantizer_keys() - set(own)):
        if getattr(cfg, key) != DEFAULTS[key]:
            users = ", ".join(name for name, cls in QUANTIZERS.items() if key in cls.options)
            raise VQVAEError(f"{key} applies to {users} only, not to quantizer {cfg.quantizer}; leave it out")
    for key, choices in CHOICES.items():
        value = getattr(cfg, key)
        if value not in choices:
            raise VQVAEError(f"{key}: unknown value '{value}'{nearest_name(value, choices)}; choose from {', '.join(choices)}")
    if not (cfg.device == "auto" or cfg.device in ("cpu", "mps", "cuda") or cfg.device.startswith("cuda:")):
        raise VQVAEError(f"device: unknown value '{cfg.device}'; choose auto, cpu, cuda, cuda:N or mps")
    at_least = {"codebook_size": 1, "batch_size": 1, "eval_batch_size": 1, "epochs": 1, "ba_iters": 1,
                "log_every": 1, "synthetic_size": 1, "kmeans_iters": 0, "max_steps": 0, "checkpoint_freq": 0,
                "save_every_steps": 0}
    for key, low in at_least.items():
        if getattr(cfg, key) < low:
            raise VQVAEError(f"{key} must be ≥ {low}, got {getattr(cfg, key)}")
    for key in ("n_hid", "latent_dim"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 1:
            raise VQVAEError(f"{key} must be ≥ 1, got {getattr(cfg, key)}")
    positive = ("lr", "beta_start", "beta_end")
    non_negative = ("weight_decay", "commitment_weight", "entropy_weight", "codebook_weight", "dead_code_threshold")
    for key in positive + non_negative:
        value = getattr(cfg, key)
        if not math.isfinite(value) or value < 0 or (key in positive and value == 0):
            raise VQVAEError(f"{key} must be a finite number {'> 0' if key in positive else '≥ 0'}, got {value}")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise VQVAEError(f"ema_decay must be in [0, 1), got {cfg.ema_decay}")
    QUANTIZERS[cfg.quantizer].check(cfg)
    preset = ARCH_PRESETS[cfg.arch]
    return dataclasses.replace(cfg, n_hid=cfg.n_hid or preset["n_hid"], latent_dim=cfg.latent_dim or preset["latent_dim"])


def load_config(yaml_path=None, overrides: Optional[dict] = None, base: Optional[dict] = None) -> Config:
    """defaults ← base (a saved run's config, its own quantizer's options) ← YAML file ← overrides (flags)."""
    cfg = Config()
    if base:
        cfg = apply_overrides(cfg, applicable(base, base.get("quantizer", cfg.quantizer)), "the saved run config")
    if yaml_path:
        cfg = apply_overrides(cfg, read_yaml(yaml_path), str(yaml_path))
    if overrides:
        cfg = apply_overrides(cfg, overrides, "command-line flags")
    return validate(cfg)


def result_differences(saved: dict, cfg: Config, allow=()) -> list[tuple]:
    """(key, then, now) where a saved config differs from cfg in a result-changing key: what resume and sweeps check."""
    then, now = dataclasses.asdict(load_config(base=saved)), dataclasses.asdict(cfg)
    return [(k, then[k], now[k]) for k in now if k not in RUNTIME_KEYS + tuple(allow) and then[k] != now[k]]


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False, allow_unicode=True, default_flow_style=None)


# ---------------------------------------------------------------------------------------------
# Data: the whole dataset as one uint8 tensor (N, 3, 32, 32) on the training device
# ---------------------------------------------------------------------------------------------

IMAGE_SIZE = 32
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
CACHE_VERSION = "1"


def make_synthetic(n: int, seed: int) -> np.ndarray:
    """Deterministic images (n, 32, 32, 3) uint8: gradient backgrounds with discs, rectangles or stripes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] / (IMAGE_SIZE - 1)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    for i in range(n):
        angle = rng.uniform(0, 2 * np.pi)
        ramp = np.cos(angle) * xx + np.sin(angle) * yy
        ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min())
        low, high = rng.uniform(0, 1, (2, 3))
        img = low + (high - low) * ramp[..., None]
        for _ in range(rng.integers(1, 4)):
            colour = rng.uniform(0, 1, 3)
            cx, cy = rng.uniform(0.15, 0.85, 2)
            size = rng.uniform(0.1, 0.3)
            kind = rng.integers(3)
            if kind == 0:  # disc
                mask = (xx - cx) ** 2 + (yy - cy) ** 2 < size**2
            elif kind == 1:  # axis-aligned rectangle
                w, h = rng.uniform(0.1, 0.35, 2)
                mask = (np.abs(xx - cx) < w) & (np.abs(yy - cy) < h)
            else:  # stripes inside a square patch
                theta, freq = rng.uniform(0, np.pi), rng.uniform(8, 20)
                stripes = np.sin(freq * (np.cos(theta) * xx + np.sin(theta) * yy)) > 0
                mask = stripes & (np.abs(xx - cx) < size) & (np.abs(yy - cy) < size)
            img[mask] = colour
        images[i] = img
    return np.round(images * 255).astype(np.uint8)


def _decode_image(path: Path) -> np.ndarray:
    """One image file → (32, 32, 3) uint8 RGB; centre-cropped to a square and resized unless already 32×32."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (IMAGE_SIZE, IMAGE_SIZE):
                side = min(im.size)
                left, top = (im.width - side) // 2, (im.height - side) // 2
                im = im.crop((left, top, left + side, top + side)).resize(
                    (IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
            return np.asarray(im, dtype=np.uint8)
    except Exception as e:  # PIL raises many kinds for a bad file
        raise VQVAEError(f"cannot read image {path}: {e}; remove or replace the file") from None


def load_image_folder(root: Path, split: str) -> np.ndarray:
    """Images under root/split (any sub-folders) as (N, 32, 32, 3) uint8 in path order, cached in root/.vqvae_cache/."""
    folder = root / split
    if not folder.is_dir():
        raise VQVAEError(
            f"image folder {folder} not found: --dataset folder needs --data_dir with train/ and test/ "
            f"sub-folders of images (for a CIFAR-10 copy as image files, e.g. cifar10-jpeg.tar.gz: tar xzf "
            f"cifar10-jpeg.tar.gz -C DIR and --data_dir DIR/cifar10-jpeg), or use --dataset cifar10 to download it")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise VQVAEError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {folder}")
    key = hashlib.sha1(CACHE_VERSION.encode())
    for p in files:
        stat = p.stat()
        key.update(f"{p.relative_to(folder)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    cache = root / ".vqvae_cache" / f"{split}-{key.hexdigest()[:16]}.npy"
    if cache.is_file():
        return np.load(cache)
    print(f"decoding {len(files)} images from {folder} (cached for later runs)")
    images = np.stack([_decode_image(p) for p in files])
    try:
        cache.parent.mkdir(exist_ok=True)
        buffer = io.BytesIO()
        np.save(buffer, images)
        atomic_write_bytes(cache, buffer.getvalue())
    except OSError as e:
        print(f"note: could not write the decode cache {cache} ({e.strerror}); images are decoded on every run")
    return images


def load_cifar10(data_dir: Path):
    """torchvision's CIFAR-10, downloaded into data_dir when it is not already there."""
    from torchvision.datasets import CIFAR10

    old_timeout, made = socket.getdefaulttimeout(), not data_dir.exists()
    socket.setdefaulttimeout(30)  # a dead network fails in seconds rather than hanging
    try:
        train = CIFAR10(str(data_dir), train=True, download=True)
        test = CIFAR10(str(data_dir), train=False, download=False)
    except Exception as e:
        if made and data_dir.is_dir() and not any(data_dir.iterdir()):
            data_dir.rmdir()  # a failed start leaves no empty directory behind
        raise VQVAEError(
            f"could not get CIFAR-10 into --data_dir {data_dir} ({type(e).__name__}: {e}). Offline? Put "
            f"torchvision's cifar-10-batches-py/ in --data_dir, or use --dataset folder --data_dir DIR with "
            f"train/ and test/ image folders (e.g. the CIFAR-10 JPEG copy), or --dataset synthetic") from None
    finally:
        socket.setdefaulttimeout(old_timeout)
    return train.data, test.data


def load_dataset(cfg: Config):
    """(train, test) as uint8 numpy arrays (N, 32, 32, 3)."""
    if cfg.dataset == "synthetic":
        return make_synthetic(cfg.synthetic_size, seed=0), make_synthetic(max(cfg.synthetic_size // 4, 1), seed=1)
    if cfg.dataset == "folder":
        root = Path(cfg.data_dir)
        return load_image_folder(root, "train"), load_image_folder(root, "test")
    return load_cifar10(Path(cfg.data_dir))


def to_device_uint8(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """(N, 32, 32, 3) uint8 numpy → uint8 (N, 3, 32, 32) on device, stored channels-last as it comes."""
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2)


def normalize(x_uint8: torch.Tensor, pixel_range: str = "signed") -> torch.Tensor:
    """uint8 [0, 255] → float [−1, 1] (signed) or [0, 1] (unit), on the device; the memory layout is kept."""
    if pixel_range == "unit":
        return x_uint8.float().div_(255.0)
    return x_uint8.float().div_(127.5).sub_(1.0)


def to_unit_range(x: torch.Tensor, pixel_range: str) -> torch.Tensor:
    """Model-range images → [0, 1] pixels."""
    return x if pixel_range == "unit" else (x + 1) / 2


def get_batch(x_uint8: torch.Tensor, perm: torch.Tensor, i: int, batch_size: int, channels_last: bool = True,
              shard: tuple = (0, 1), pixel_range: str = "signed"):
    """Batch i of a permutation as float (B, 3, 32, 32); shard (rank, processes): this process's share."""
    rank, n = shard
    local = batch_size // n
    start = i * batch_size + rank * local
    x = normalize(x_uint8[perm[start:start + local]], pixel_range)
    return x if channels_last else x.contiguous()


def augment_crop_flip(x: torch.Tensor, generator: torch.Generator, shard: tuple = (0, 1), pad: int = 4) -> torch.Tensor:
    """augment crop_flip: each image of x (B, C, H, W) cropped back to H×W at a random offset of its copy
    reflect-padded by `pad`, then flipped left–right with probability ½ (torchvision's RandomCrop +
    RandomHorizontalFlip), on the device. Drawn for the whole global batch (shard: rank, processes),
    so a run is the same whatever the number of processes and resumes bitwise."""
    rank, n = shard
    B, C, H, W = x.shape
    draws = generator.device
    offsets = torch.randint(0, 2 * pad + 1, (2, n * B, 1), generator=generator, device=draws)[:, rank * B:(rank + 1) * B]
    flip = (torch.rand(n * B, 1, generator=generator, device=draws) < 0.5)[rank * B:(rank + 1) * B]
    offsets, flip = offsets.to(x.device), flip.to(x.device)
    rows = offsets[0] + torch.arange(H, device=x.device)                                 # (B, H)
    cols = offsets[1] + torch.arange(W, device=x.device)                                 # (B, W)
    cols = torch.where(flip, cols.flip(1), cols)                     # a flipped image reads its columns backwards
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")                              # (B, C, H+2p, W+2p)
    batch = torch.arange(B, device=x.device)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)       # (B, C, H, W), NHWC memory
    return out if x.is_contiguous(memory_format=torch.channels_last) else out.contiguous()  # x's memory layout


# ---------------------------------------------------------------------------------------------
# Encoder and decoder
# ---------------------------------------------------------------------------------------------


class ResidualBlock(nn.Module):
    """x → relu(x + conv3×3(relu(conv3×3(x)))), channels kept (the bavq-research block)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return F.relu(x + self.conv2(F.relu(self.conv1(x), inplace=True)), inplace=True)


class BottleneckBlock(nn.Module):
    """x → relu(x + conv1×1(relu(conv3×3(x)))), 3×3 conv at a quarter of the channels (sonnet's block)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels // 4, 3, padding=1)
        self.conv2 = nn.Conv2d(channels // 4, channels, 1)

    def forward(self, x):
        return F.relu(x + self.conv2(F.relu(self.conv1(x), inplace=True)), inplace=True)


def make_encoder(arch: str, n_hid: int, latent_dim: int) -> nn.Sequential:
    """(B, 3, 32, 32) → z_e (B, latent_dim, 8, 8); in-place ReLUs (a conv's backward needs its input only)."""
    if arch == "small":
        return nn.Sequential(
            nn.Conv2d(3, n_hid, 4, stride=2, padding=1), nn.ReLU(inplace=True),          # (B, n_hid, 16, 16)
            nn.Conv2d(n_hid, 2 * n_hid, 4, stride=2, padding=1), nn.ReLU(inplace=True),  # (B, 2n_hid, 8, 8)
            nn.Conv2d(2 * n_hid, latent_dim, 1))
    if arch == "sonnet":  # the published study's model: 1×1 projection from 2·n_hid channels to the codes
        return nn.Sequential(
            nn.Conv2d(3, n_hid, 4, stride=2, padding=1), nn.ReLU(inplace=True),          # (B, n_hid, 16, 16)
            nn.Conv2d(n_hid, 2 * n_hid, 4, stride=2, padding=1), nn.ReLU(inplace=True),  # (B, 2n_hid, 8, 8)
            nn.Conv2d(2 * n_hid, 2 * n_hid, 3, padding=1), nn.ReLU(inplace=True),
            BottleneckBlock(2 * n_hid), BottleneckBlock(2 * n_hid),
            nn.Conv2d(2 * n_hid, latent_dim, 1))
    return nn.Sequential(
        nn.Conv2d(3, n_hid, 4, stride=2, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(n_hid, 2 * n_hid, 4, stride=2, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(2 * n_hid, latent_dim, 3, padding=1),
        ResidualBlock(latent_dim), ResidualBlock(latent_dim))


def make_decoder(arch: str, n_hid: int, latent_dim: int) -> nn.Sequential:
    """z_q (B, latent_dim, 8, 8) → x_hat (B, 3, 32, 32) in roughly [−1, 1] (no output squashing)."""
    if arch == "small":
        return nn.Sequential(
            nn.Conv2d(latent_dim, n_hid, 1),
            nn.ConvTranspose2d(n_hid, n_hid, 4, stride=2, padding=1), nn.ReLU(inplace=True),  # (B, n_hid, 16, 16)
            nn.ConvTranspose2d(n_hid, 3, 4, stride=2, padding=1))                            # (B, 3, 32, 32)
    if arch == "sonnet":  # a 1×1 conv on the codes, then the sonnet decoder
        return nn.Sequential(
            nn.Conv2d(latent_dim, latent_dim, 1),
            nn.Conv2d(latent_dim, 2 * n_hid, 3, padding=1), nn.ReLU(inplace=True),
            BottleneckBlock(2 * n_hid), BottleneckBlock(2 * n_hid),
            nn.ConvTranspose2d(2 * n_hid, n_hid, 4, stride=2, padding=1), nn.ReLU(inplace=True),  # (B, n_hid, 16, 16)
            nn.ConvTranspose2d(n_hid, 3, 4, stride=2, padding=1))                                # (B, 3, 32, 32)
    return nn.Sequential(
        nn.Conv2d(latent_dim, 2 * n_hid, 3, padding=1),
        ResidualBlock(2 * n_hid), ResidualBlock(2 * n_hid),
        nn.ConvTranspose2d(2 * n_hid, n_hid, 4, stride=2, padding=1), nn.ReLU(inplace=True),
        nn.ConvTranspose2d(n_hid, 3, 4, stride=2, padding=1))


# ---------------------------------------------------------------------------------------------
# Quantizers. Every one keeps the same contract (class Quantizer), so the training loop names none:
#   forward(z_e (B, D, H, W)) → z_q (B, D, H, W), {loss name: scalar}, indices (B, H, W) in [0, K)
#   codebook_size (K); options, the Config keys it reads, and check(cfg), run before any work;
#   before_step(step, total_steps) for schedules such as β; log_values() for numbers to log;
#   init_from_data(cfg) and init_codebook(...) for a k-means start, if it has a codebook.
# A new quantizer is one class with @register("name"). Assignment math runs in fp32, also under autocast.
# ---------------------------------------------------------------------------------------------

# N×K work (distances, BA logits) runs in row chunks: memory O(chunk × K) whatever N is. A CPU chunk
# holds CHUNK_ELEMENTS entries (2 MiB of fp32, cache-sized) and at least MIN_CHUNK_ROWS rows; a GPU
# chunk GPU_CHUNK_ELEMENTS (64 MiB: each chunk costs kernel launches). The BA E-step keeps p(k|e) for
# backward while N×K ≤ KEEP_ELEMENTS, and recomputes it chunk by chunk beyond.
CHUNK_ELEMENTS = 2**19
PRIOR_FLOOR = 1e-20  # smallest running-prior share a code keeps (its log stays finite)
PRIOR_DECAY = 0.99   # EMA decay of BA's running prior (ba_prior running), the published layer's
SCALE_DECAY = 0.99   # EMA decay of σ, BA's distance unit with beta_units relative or critical
EMA_EPS = 1e-5       # Laplace smoothing of the EMA codebooks' cluster sizes
GPU_CHUNK_ELEMENTS = 2**24
MIN_CHUNK_ROWS = 32
KEEP_ELEMENTS = 2**24


# fp32 matrix products on a CPU: PyTorch sends them to MKL, which on AMD CPUs runs its AVX2 code, while
# oneDNN (PyTorch's other CPU library, the one its convolutions run on) uses AVX-512 there, in the same
# IEEE fp32 (a test bounds its error against float64). On a Zen 5 EPYC that doubled the rate of an
# E-step's N×K products. ONEDNN_MM = False sends every product to torch.mm.
ONEDNN_MM = True


@functools.cache
def onednn_mm_available() -> bool:
    """Whether this PyTorch has oneDNN's fp32 linear operator and this CPU runs AVX-512 code."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and torch.backends.cpu.get_cpu_capability() == "AVX512")


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for a (M, K), b (K, N) → (M, N); through oneDNN for fp32 on an AVX-512 CPU outside autograd."""
    if (ONEDNN_MM and a.device.type == "cpu" and a.dtype == b.dtype == torch.float32 and onednn_mm_available()
            and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad))):
        return torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")
    return a @ b


def row_chunks(z: torch.Tensor, codebook: torch.Tensor):
    """Row slices of z (N, D) for work against codebook (K, D): the unit of all N×K work. Chunks grow
    with D beyond 64: sums into a (K, D) result (BA's codebook gradient and soft sums) stream it once a
    chunk, and at D = 256, K = 16,384 fewer, larger chunks made a resnet BA step 12% faster."""
    budget = CHUNK_ELEMENTS if z.device.type == "cpu" else GPU_CHUNK_ELEMENTS
    rows = max(MIN_CHUNK_ROWS, budget * max(1, codebook.shape[1] // 64) // codebook.shape[0])
    return [slice(start, start + rows) for start in range(0, z.shape[0], rows)]


def squared_distances(z: torch.Tensor, codebook: torch.Tensor, z2: Optional[torch.Tensor] = None) -> torch.Tensor:
    """‖z_n − c_k‖² for z (N, D), codebook (K, D) → (N, K); z2 (N, 1): ‖z_n‖², when the caller has it."""
    c2 = codebook.pow(2).sum(1)
    z2 = z.pow(2).sum(1, keepdim=True) if z2 is None else z2
    return torch.addmm(c2, z, codebook.t(), alpha=-2).add_(z2).clamp_(min=0)


ARGMAX_BLOCK = 64


def argmax_rows(scores: torch.Tensor) -> torch.Tensor:
    """scores (n, K) → each row's first argmax; on a CPU by blocks of 64 codes first (3× faster at K = 16,384)."""
    n, K = scores.shape
    if K % ARGMAX_BLOCK or scores.device.type != "cpu":
        return scores.argmax(1)
    blocks = scores.view(n, K // ARGMAX_BLOCK, ARGMAX_BLOCK)
    best = blocks.amax(2).argmax(1, keepdim=True)                                     # (n, 1)
    inside = blocks.gather(1, best.unsqueeze(2).expand(n, 1, ARGMAX_BLOCK)).squeeze(1)  # (n, 64)
    return best.squeeze(1) * ARGMAX_BLOCK + inside.argmax(1)


def argmax_columns(scores: torch.Tensor) -> torch.Tensor:
    """scores (K, n) → each column's first argmax, by blocks of 64 codes first (15× faster than argmax(0)
    on a CPU at K = 16,384: the block maxima are reductions along the contiguous axis)."""
    K, n = scores.shape
    if K % ARGMAX_BLOCK or scores.device.type != "cpu":
        return scores.argmax(0)
    blocks = scores.view(K // ARGMAX_BLOCK, ARGMAX_BLOCK, n)
    best = blocks.amax(1).argmax(0)                                                   # (n,)
    inside = blocks[best, :, torch.arange(n, device=scores.device)].argmax(1)         # (n,) from (n, 64)
    return best * ARGMAX_BLOCK + inside


def nearest_code(z: torch.Tensor, codebook: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """argmin_k ‖z_n − c_k‖² − bias_k for each row of z (N, D) → (N,), in row chunks (memory O(chunk × K);
    one preallocated result, since small per-chunk results fragment the CPU heap at large K). The score
    2 z·c − ‖c‖² + bias suffices. With native bf16 and large K, nearest_code_screened is faster."""
    if screen_applies(z, codebook):
        return nearest_code_screened(z, codebook, bias)
    with torch.no_grad():
        score_bias = -codebook.pow(2).sum(1) if bias is None else bias - codebook.pow(2).sum(1)
        idx = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
        for rows in row_chunks(z, codebook):
            idx[rows] = argmax_rows(mm(2 * z[rows], codebook.t()).add_(score_bias))
        return idx


# The bf16 screen. A CPU with native bf16 dot products (AVX512-BF16, AMX) multiplies bf16 5× faster than
# fp32, and at large K the score matmul is most of a VQ step. The screen scores every code in bf16,
# keeps the few whose exact score could still be the best, and decides among them in fp32 (below
# SCREEN_MIN_K the fp32 pass is as fast). SCREEN_ALPHA bounds the bf16 error (nearest_code_screened).
SCREEN_MIN_K = 2048
SCREEN_ALPHA = 9 * 2**-11  # 2.25 u, u = 2⁻⁸ (bf16's unit roundoff)
SCREEN_CHUNK_ELEMENTS = 2**22


def native_bf16_matmul() -> bool:
    cpu = torch.cpu
    return any(getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def screen_applies(z: torch.Tensor, codebook: torch.Tensor, fp32_pays: bool = False) -> bool:
    """Whether screen() runs for z (N, D) against codebook (K, D): on a CPU, fp32, large K in whole blocks,
    and native bf16 unless fp32_pays. Without native bf16 the screen scores in fp32, which costs what
    the dense scores do: it pays for BA's E-step (it saves the exponentials and the soft sums) but not
    for the nearest code."""
    K = codebook.shape[0]
    return (SCREEN_MIN_K > 0 and K >= SCREEN_MIN_K and K % ARGMAX_BLOCK == 0 and z.device.type == "cpu"
            and z.dtype == codebook.dtype == torch.float32 and (fp32_pays or native_bf16_matmul()))


def bf16_at_most(x: torch.Tensor) -> torch.Tensor:
    """The largest bf16 value ≤ x, elementwise."""
    nearest = x.bfloat16()
    return torch.where(nearest.float() > x, torch.nextafter(nearest, torch.full_like(nearest, -math.inf)), nearest)


@torch.no_grad()
def screen(z: torch.Tensor, codebook: torch.Tensor, bias: Optional[torch.Tensor] = None, margin: float = 0.0,
           max_share: float = 1.0, c2: Optional[torch.Tensor] = None):
    """The bf16 screen, by chunks of rows of z (N, D): yields (rows, r, k), the candidates (r the row
    within the chunk, k the code). Every code whose exact score
    s_k = 2 z·c_k − ‖c_k‖² + bias_k is within `margin` of its row's best is a candidate (a few others
    may be). Why none is lost:
    - one bf16 matmul of [2z, 1] and [c_k, −(1 − 2α)‖c_k‖² + b_k + 2α|b_k|] (inputs rounded to bf16,
      products exact, sums in fp32) gives t'_k ≈ t_k = s_k + 2α‖c_k‖² + 2α|b_k| within (2u + u² + fp32
      sums) of Σ|terms| ≤ α(2‖z‖‖c_k‖ + ‖c_k‖² + (1 + 2α)|b_k|) ≤ α(‖z‖² + 2‖c_k‖²) + 2α|b_k|, with
      α = SCREEN_ALPHA = 2.25 u, u = 2⁻⁸;
    - so every code with s_k ≥ s_j − margin (j any code) has t'_k ≥ s_j − margin − α‖z‖²: the extra
      terms in t pay for the code-dependent part of the error, and the threshold depends on the row alone;
    - the matmul rounds t'_k to bf16 on output; rounding is monotone, so comparing it with the
      threshold rounded down to bf16 loses nothing;
    - j = the code with the largest bf16 score (found through the maxima of K / ARGMAX_BLOCK blocks of
      ARGMAX_BLOCK codes), scored exactly in fp32. Only blocks whose maximum reaches the threshold are opened.
    Without native bf16 the same matmul runs in fp32 and its scores are compared as they are: with
    u = 2⁻²⁴, ‖c_k‖² and the column are off by at most (D + 4)·u·(‖c_k‖² + 2|b_k|), the dot products (any
    summation order; Higham's γ) by (D + 1)·u·Σ|terms|, which α = ε = 2(D + 4)·u (8·10⁻⁶ at D = 64) covers.
    The threshold, s_j computed in fp32 on either path, is lowered by ε·(‖z‖² + 2‖c_j‖² + |b_j| + margin),
    more than its own rounding.
    Where the candidates so far are more than max_share of the scores screened so far (or a chunk opens
    half its blocks), yields (rows, None) and stops: the caller's dense path is then the faster one. The
    share is the batch's, not each chunk's: a few crowded chunks in a sparse batch stay sparse.
    c2 = ‖c_k‖² (K,), when the caller has it."""
    (N, D), K = z.shape, codebook.shape[0]
    bf16, fp32_eps = native_bf16_matmul(), 2 * (D + 4) * 2**-24
    dtype, alpha = (torch.bfloat16, SCREEN_ALPHA) if bf16 else (torch.float32, fp32_eps)
    c2 = codebook.pow(2).sum(1) if c2 is None else c2                                      # (K,)
    b = torch.zeros_like(c2) if bias is None else bias.clamp_min(-1e30)  # a −inf bias: never a candidate
    column = -(1 - 2 * alpha) * c2 + b + 2 * alpha * b.abs()
    c_aug = torch.cat([codebook, column[:, None]], 1).to(dtype).t()                        # (D+1, K)
    z_aug = torch.cat([2 * z, z.new_ones(N, 1)], 1).to(dtype)                              # (N, D+1)
    z2 = z.pow(2).sum(1)                                                                   # (N,)
    slack = alpha * z2 + margin
    step, B, found = max(MIN_CHUNK_ROWS, SCREEN_CHUNK_ELEMENTS // K), K // ARGMAX_BLOCK, 0
    # block b holds codes b, b + B, b + 2B, …: a maximum across rows of B scores runs 5× faster in bf16
    # on a CPU than one along rows of 64 (vectorised along the contiguous axis)
    for start in range(0, N, step):
        rows = slice(start, min(start + step, N))
        zr = z[rows]
        n = zr.shape[0]
        blocks = (z_aug[rows] @ c_aug).view(n, ARGMAX_BLOCK, B)                         # (n, 64, B)
        block_max = blocks.amax(1)                                                        # (n, B)
        best_block = block_max.float().argmax(1)
        j = blocks[torch.arange(n, device=z.device), :, best_block].float().argmax(1) * B + best_block
        rounding = fp32_eps * (z2[rows] + 2 * c2[j] + b[j].abs() + margin)
        threshold = 2 * (zr * codebook[j]).sum(1) - c2[j] + b[j] - slack[rows] - rounding   # (n,)
        threshold = bf16_at_most(threshold) if bf16 else threshold
        opened = block_max >= threshold[:, None]                                         # blocks to open
        if max_share < 1 and opened.sum() > max(2 * max_share, 0.5) * opened.numel():
            yield rows, None
            return
        if opened.sum() * 8 > opened.numel():  # many blocks open: one pass over all scores is cheaper
            r, offset, block = (blocks >= threshold[:, None, None]).nonzero(as_tuple=True)
            k = offset * B + block
        else:
            row, block = opened.nonzero(as_tuple=True)
            hit, offset = (blocks[row, :, block] >= threshold[row, None]).nonzero(as_tuple=True)
            r, k = row[hit], offset * B + block[hit]
        found += r.numel()
        if found > max_share * rows.stop * K:
            yield rows, None
            return
        yield rows, r, k


def nearest_code_screened(z: torch.Tensor, codebook: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """nearest_code(z, codebook, bias) (N,) through the bf16 screen (margin 0): the fp32 nearest code,
    exact up to ties within fp32 rounding. The candidates (one or two a row on a trained codebook) are
    scored in fp32 and the best wins, the lowest index among equals, as argmax does."""
    N, K = z.shape[0], codebook.shape[0]
    c2 = codebook.pow(2).sum(1)
    score_bias = -c2 if bias is None else bias - c2
    idx = torch.empty(N, dtype=torch.long, device=z.device)
    for rows, r, k in screen(z, codebook, bias, c2=c2):
        exact = 2 * (z[rows][r] * codebook[k]).sum(1) + score_bias[k]
        n = rows.stop - rows.start
        best = torch.full((n,), -math.inf, device=z.device).scatter_reduce_(0, r, exact, "amax")
        winner = exact == best[r]
        idx[rows] = torch.full((n,), K, device=z.device).scatter_reduce_(0, r[winner], k[winner], "amin")
    return idx


KMEANS_SEEDING_ROUNDS = 256


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007), ⌈k / KMEANS_SEEDING_ROUNDS⌉ distinct centres per
    round (seconds, not minutes, at large k), then `iters` Lloyd steps: x (N, D) → (k, D). An empty
    cluster keeps its centre."""
    n = x.shape[0]
    if n < k:
        raise VQVAEError(f"k-means init needs at least K={k} vectors, got {n}")
    per_round = -(-k // KMEANS_SEEDING_ROUNDS)
    centers = x.new_empty(k, x.shape[1])
    centers[:1] = x[torch.randint(n, (1,), generator=generator, device=generator.device).to(x.device)]
    x2 = x.pow(2).sum(1, keepdim=True)  # once, not every round: at K = 16,384 that was most of the seeding
    min_d = squared_distances(x, centers[:1], x2)[:, 0]
    chosen = 1
    while chosen < k:
        # the floor keeps the draw defined when points already coincide with centres
        take = min(per_round, k - chosen)
        weights = min_d.clamp_min(1e-30).to(generator.device)
        new = x[torch.multinomial(weights, take, replacement=False, generator=generator).to(x.device)]
        torch.minimum(min_d, squared_distances(x, new, x2).min(1).values, out=min_d)
        centers[chosen:chosen + take] = new
        chosen += take
    for _ in range(iters):
        assign = nearest_code(x, centers)
        counts = torch.zeros(k, device=x.device).index_add_(0, assign, torch.ones(n, device=x.device))
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        filled = counts > 0
        centers[filled] = sums[filled] / counts[filled, None]
    return centers


def register(name: str):
    """Class decorator: make a quantizer class available as `quantizer: name`."""
    def add(cls):
        QUANTIZERS[name] = cls
        return cls
    return add


class Quantizer(nn.Module):
    """The contract every quantizer keeps, with do-nothing defaults (see the section's head)."""

    options: tuple = ()  # the Config keys it reads; those of other quantizers are refused

    @classmethod
    def check(cls, cfg) -> None:
        """Refuse a bad combination of this quantizer's own options, before any work."""

    @classmethod
    def num_codes(cls, cfg) -> int:
        """K, the number of codes its indices range over."""
        return cfg.codebook_size

    @classmethod
    def init_from_data(cls, cfg) -> bool:
        """Whether training starts by calling init_codebook on encoder outputs."""
        return False

    def before_step(self, step: int, total_steps: int) -> None:
        """Called by the training loop before each optimizer step: schedules live here."""

    def log_values(self) -> dict:
        """Numbers of its own state to log with every training and validation record."""
        return {}


class CodebookQuantizer(Quantizer):
    """A (K, D) codebook, its k-means start, EMA statistics in buffers (EMA codebooks) and dead-code re-seeding."""

    options = ("codebook_size", "commitment_weight", "codebook_init", "kmeans_iters", "ema_decay", "dead_code_threshold")

    def __init__(self, cfg, ema: bool):
        super().__init__()
        K = self.codebook_size = cfg.codebook_size
        self.ema, self.ema_decay, self.dead_code_threshold = ema, cfg.ema_decay, cfg.dead_code_threshold
        self.codebook = nn.Parameter(torch.empty(K, cfg.latent_dim).uniform_(-1 / K, 1 / K), requires_grad=not ema)
        if ema:
            # cluster_size starts at one and embed_sum at the codebook, so codebook = embed_sum / cluster_size
            self.register_buffer("cluster_size", torch.ones(K))
            self.register_buffer("embed_sum", self.codebook.detach().clone())

    @classmethod
    def init_from_data(cls, cfg) -> bool:
        return cfg.codebook_init != "uniform"

    @torch.no_grad()
    def init_codebook(self, vectors: torch.Tensor, iters: int, generator: torch.Generator) -> None:
        self.codebook.copy_(kmeans(vectors.float(), self.codebook_size, iters, generator))
        if self.ema:
            self.cluster_size.fill_(1.0)
            self.embed_sum.copy_(self.codebook)

    @torch.no_grad()
    def ema_update(self, counts: torch.Tensor, sums: torch.Tensor, z: torch.Tensor) -> None:
        """counts (K,), sums (K, D): each code's (global-batch) mass and the encoder outputs summed with
        those weights. Codes become EMA(sums) / smoothed EMA(counts), then dead ones are re-seeded from z."""
        self.cluster_size.lerp_(counts, 1 - self.ema_decay)
        self.embed_sum.lerp_(sums, 1 - self.ema_decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + EMA_EPS) / (n + self.codebook_size * EMA_EPS) * n
        self.codebook.copy_(self.embed_sum / smoothed.unsqueeze(1))
        if self.dead_code_threshold > 0:
            self.reseed_dead_codes(z)

    @torch.no_grad()
    def reseed_dead_codes(self, z: torch.Tensor) -> torch.Tensor:
        """Codes whose EMA usage (assignments per batch) fell below dead_code_threshold move to random
        rows of z (N, D) and restart at the threshold's mass, so one stays while it wins that many per
        batch. Returns which moved, (K,) bool; reads nothing back from the device."""
        dead = (self.cluster_size < self.dead_code_threshold).unsqueeze(1)      # (K, 1)
        picks = z[torch.randint(z.shape[0], (self.codebook_size,), device=z.device)]  # (K, D)
        broadcast_(picks)  # data-parallel: rank 0's draws, so every process's codebook stays the same
        self.cluster_size.masked_fill_(dead.squeeze(1), self.dead_code_threshold)
        self.embed_sum.copy_(torch.where(dead, picks * self.dead_code_threshold, self.embed_sum))
        self.codebook.copy_(torch.where(dead, picks, self.codebook))
        return dead.squeeze(1)


def rotate_to(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The rotation trick (Fifty et al. 2024): rows z, q (N, D) → q in value, with the gradient of s·R·z,
    R rotating z's direction ê onto q's q̂ and s = ‖q‖/‖z‖, both constants: the decoder's gradient reaches
    the encoder rotated into z's frame. R = I − 2·r·rᵀ + 2·q̂·êᵀ, r = (ê + q̂)/‖ê + q̂‖."""
    eps = 1e-12
    z_norm, q_norm = z.detach().norm(dim=1, keepdim=True), q.detach().norm(dim=1, keepdim=True)  # (N, 1)
    e_hat, q_hat = z.detach() / z_norm.clamp_min(eps), q.detach() / q_norm.clamp_min(eps)         # (N, D)
    r = F.normalize(e_hat + q_hat, dim=1, eps=eps)
    rotated = z - 2 * r * (r * z).sum(1, keepdim=True) + 2 * q_hat * (e_hat * z).sum(1, keepdim=True)
    out = rotated * (q_norm / z_norm.clamp_min(eps))
    return out + (q.detach() - out).detach()


@register("vq_ema")
class VQEMA(CodebookQuantizer):
    """Nearest-code vector quantization with a straight-through (or rotation-trick) gradient and an EMA
    codebook (van den Oord et al. 2017, appendix A.1). Loss: commitment_weight · ‖z_e − sg(z_q)‖²."""

    options = CodebookQuantizer.options + ("grad_estimator",)

    def __init__(self, cfg: Config):
        super().__init__(cfg, ema=True)
        self.commitment_weight, self.grad_estimator = cfg.commitment_weight, cfg.grad_estimator

    def forward(self, z_e):
        with torch.autocast(z_e.device.type, enabled=False):
            z = flatten_latents(z_e).float()                             # (N, D)
            idx = nearest_code(z.detach(), self.codebook)                # (N,)
            z_q = F.embedding(idx, self.codebook)                        # (N, D)
            losses = {"commitment": self.commitment_weight * F.mse_loss(z, z_q.detach())}
            if self.training:
                ones = torch.ones_like(idx, dtype=z.dtype)
                counts = torch.zeros(self.codebook_size, device=z.device).index_add_(0, idx, ones)
                sums = torch.zeros_like(self.codebook).index_add_(0, idx, z.detach())
                self.ema_update(all_reduce_(counts), all_reduce_(sums), z.detach())  # global-batch statistics
                if self.grad_estimator == "rotation":
                    z_q = rotate_to(z, z_q)
                else:
                    z_q = z + (z_q - z).detach()                         # straight-through
            return unflatten_latents(z_q, z_e), losses, idx.view(z_e.shape[0], *z_e.shape[2:])


def ba_logits(z: torch.Tensor, codebook: torch.Tensor, log_q: torch.Tensor, beta: float,
              c2: Optional[torch.Tensor] = None, codes_first: bool = False) -> torch.Tensor:
    """The Blahut–Arimoto assignment rule, written once: edit it here. log p(k|e_n) up to a constant
    per row, log Q(k) − β·‖z_n − c_k‖², for z (n, D), codebook (K, D), log_q (K,) → (n, K), or (K, n)
    with codes_first; β·‖z_n‖² is dropped (the same for every k: softmax and argmax over k are
    unchanged). c2 = ‖c_k‖² (K,), when the caller has it. Every BA step calls it: the E/M iterations,
    the last E-step and the code at evaluation. BAEStep's backward and the nearest-code form of
    evaluation are derived from this rule, so after an edit run with ba_fast_path false (the tests
    check both against it)."""
    c2 = codebook.pow(2).sum(1) if c2 is None else c2
    if codes_first:
        return mm(codebook, (2 * beta * z).t()).add_((log_q - beta * c2).unsqueeze(1))
    return torch.addmm(log_q - beta * c2, z, codebook.t(), alpha=2 * beta)


def ba_m_step(log_mass: torch.Tensor, n: int) -> torch.Tensor:
    """The M-step Q(k) = mean_n p(k|e_n) over the global batch, in the log domain, from this process's log Σ_n p (K,)."""
    return all_reduce_logsumexp_(log_mass) - math.log(n * world()[1])


def batch_marginal(p_sum: torch.Tensor, n: int) -> torch.Tensor:
    """The M-step on soft counts: global Q from this process's Σ_n p (K,), its gradient through the local rows."""
    global_q = all_reduce_(p_sum.detach().clone()) / (n * world()[1])
    return p_sum / n + (global_q - p_sum / n).detach() if p_sum.requires_grad else global_q


# The screened E-step. Once β has grown, p(k|e) of most codes is far below anything that can change a
# result: it is computed over the codes whose logit is within T = log(K / BA_SCREEN_TOL) of the row's
# largest (found by the bf16 screen, which provably misses none of them). Each code left out has
# p(k|e) < e^−T, so all of them together carry less than K·e^−T = BA_SCREEN_TOL of a row's mass, and p
# normalised over the candidates is within that relative tolerance of the dense p. Where candidates
# exceed BA_SCREEN_MAX_SHARE of the scores (small β early in training, a spread prior) the dense
# path runs. BA_SCREEN_TOL = 0 switches the screen off.
BA_SCREEN_TOL = 1e-7
BA_SCREEN_MAX_SHARE = 1 / 256  # measured at K = 16,384, D = 64: near 0.4% of the scores the sparse work costs what dense does


def ba_screened_logits(z: torch.Tensor, codebook: torch.Tensor, log_q: torch.Tensor, beta: float,
                       c2: torch.Tensor) -> Optional[list]:
    """ba_logits over each row's candidates (up to the same constant per row): a list of (rows, r, k,
    logits) by chunk of rows (r the row within the chunk, k the code), or None where the dense path is to
    run instead."""
    K = codebook.shape[0]
    if not (BA_SCREEN_TOL > 0 and screen_applies(z, codebook, fp32_pays=True)):
        return None
    parts = []
    for rows, *found in screen(z, codebook, log_q / beta, math.log(K / BA_SCREEN_TOL) / beta, BA_SCREEN_MAX_SHARE, c2):
        if found[0] is None:
            return None
        r, k = found  # ba_logits at (r, k) with the distance in full: no cancellation of large terms
        parts.append((rows, r, k, log_q[k] - beta * (z[rows][r] - codebook[k]).pow(2).sum(1)))
    return parts


def group_max_and_sum(values: torch.Tensor, group: torch.Tensor, size: int) -> tuple:
    """Each group's maximum m (size,) and Σ exp(value − m) over its entries (an empty group: −inf and 0):
    log Σ exp(value) is m + log of the sum, p = exp(value − m) / sum (m taken out first keeps p exact)."""
    top = values.new_full((size,), -math.inf).scatter_reduce_(0, group, values, "amax")
    return top, values.new_zeros(size).index_add_(0, group, (values - top[group]).exp())


@torch.no_grad()
def iteration_mass(z: torch.Tensor, codebook: torch.Tensor, log_q: torch.Tensor, beta: float, c2: torch.Tensor) -> torch.Tensor:
    """Σ_n p(k|e_n) (K,) of one E-step over z (N, D), p = softmax_k ba_logits, summed in the linear
    domain: one exp per logit (the log-domain form takes two). A code's mass is exact to fp32
    rounding unless its p underflows in every row (below 10⁻³⁸ of the row's largest), where it is 0."""
    mass = torch.zeros_like(log_q)
    for rows in row_chunks(z, codebook):
        mass += torch.softmax(ba_logits(z[rows], codebook, log_q, beta, c2, codes_first=True), 0).sum(1)
    return mass


def ba_e_step(z: torch.Tensor, codebook: torch.Tensor, log_q: torch.Tensor, beta: float, hard: bool, sums: bool):
    """The last BA E-step, p(k|e_n) = softmax_k ba_logits, differentiated by autograd: z (N, D), codebook
    (K, D), log_q (K,) → z_q (N, D): Σ_k p·c_k (soft) or c_argmax with the soft gradient (hard); Q (K,);
    idx (N,); with `sums`, Σ_n p(k|e_n)·z_n (K, D). Chunks run under checkpoint (backward recomputes p)."""
    from torch.utils.checkpoint import checkpoint

    def chunk(z_rows, codebook, log_q):
        logits = ba_logits(z_rows, codebook, log_q, beta)                           # (n, K)
        p = torch.softmax(logits, dim=1)
        return p @ codebook, p.sum(0), p.t() @ z_rows.detach(), logits.detach().argmax(1)

    parts = [checkpoint(chunk, z[rows], codebook, log_q, use_reentrant=False) for rows in row_chunks(z, codebook)]
    z_q_soft = torch.cat([part[0] for part in parts])
    Q = batch_marginal(torch.stack([part[1] for part in parts]).sum(0), z.shape[0])
    idx = torch.cat([part[3] for part in parts])
    soft_sums = (all_reduce_(torch.stack([part[2] for part in parts]).sum(0)) if sums
                 else codebook.new_empty(0))
    z_q = z_q_soft + (codebook.detach()[idx] - z_q_soft).detach() if hard else z_q_soft
    return z_q, Q, idx, soft_sums


class BAEStep(torch.autograd.Function):
    """ba_e_step with a hand-derived backward, in row chunks (same values and gradients, tested; faster,
    less memory). p is kept for backward when N·K ≤ KEEP_ELEMENTS, else recomputed chunk by chunk, so no
    N×K matrix is ever whole at large K. The dense chunks hold logits and p codes first, (K, n): with
    MKL the product C·zᵀ ran 1.3–2× faster than z·Cᵀ at K ≥ 2048, and their products go through mm.
    For logits = log Q(k) − β‖z − c_k‖², with a = dL/dp = g_zq·Cᵀ + g_Q/N and G = dL/dlogits =
    p ⊙ (a − Σ_k p·a):
      dL/dz = 2β·G·C,   dL/dC = pᵀ·g_zq + 2β·Gᵀ·z − 2β·C ⊙ Σ_n G,   dL/dlog Q = Σ_n G."""

    @staticmethod
    def forward(ctx, z, codebook, log_q, beta: float, hard: bool, sums: bool):
        N, K = z.shape[0], codebook.shape[0]
        c2 = codebook.pow(2).sum(1)
        p_sum, idx = torch.zeros_like(c2), torch.empty(N, dtype=torch.long, device=z.device)
        z_q = None if hard else torch.empty_like(z)
        soft_sums = torch.zeros_like(codebook) if sums else codebook.new_empty(0)
        kept = []  # p chunk by chunk, when it is kept for backward
        ctx.parts = ba_screened_logits(z, codebook, log_q, beta, c2)          # sparse p, or None: dense
        for i, (rows, r, k, logits) in enumerate(ctx.parts or []):
            n = rows.stop - rows.start
            top, total = group_max_and_sum(logits, r, n)
            shifted = logits - top[r]
            p = shifted.exp().div_(total[r])
            win = shifted == 0                                                     # argmax, lowest code among equals
            idx[rows] = torch.full((n,), K, device=z.device).scatter_reduce_(0, r[win], k[win], "amin")
            if not hard:
                z_q[rows] = z.new_zeros(n, z.shape[1]).index_add_(0, r, p[:, None] * codebook[k])
            if sums:
                soft_sums.index_add_(0, k, p[:, None] * z[rows][r])
            p_sum.index_add_(0, k, p)
            ctx.parts[i] = (rows, r, k, p, win)
        for rows in row_chunks(z, codebook) if ctx.parts is None else []:
            logits = ba_logits(z[rows], codebook, log_q, beta, c2, codes_first=True)  # (K, n)
            idx[rows] = argmax_columns(logits)
            p = torch.softmax(logits, dim=0)
            if not hard:
                z_q[rows] = mm(p.t(), codebook)
            if sums:
                soft_sums += mm(p, z[rows])
            p_sum += p.sum(1)
            if N * K <= KEEP_ELEMENTS:
                kept.append(p)
        if hard:
            z_q = codebook.index_select(0, idx)
        ctx.save_for_backward(z, codebook, log_q, *kept)
        ctx.beta = beta
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(idx, soft_sums)
        if sums:
            all_reduce_(soft_sums)
        return z_q, batch_marginal(p_sum, N), idx, soft_sums

    @staticmethod
    def backward(ctx, g_zq, g_Q, _idx, _sums):
        # a gradient that is None (set_materialize_grads(False)) is zero: its matmuls are skipped, e.g.
        # g_zq with the straight-through output and an EMA codebook, g_Q without the entropy term
        z, codebook, log_q, *kept = ctx.saved_tensors
        beta, N = ctx.beta, z.shape[0]
        c2 = codebook.pow(2).sum(1)
        g_z, g_c, g_logit_sum = torch.empty_like(z), torch.zeros_like(codebook), torch.zeros_like(c2)
        g_q = torch.zeros_like(c2) if g_Q is None else g_Q / N
        for rows, r, k, p, win in ctx.parts or []:                             # the same sums over candidates
            n, c_k = rows.stop - rows.start, codebook[k]
            g_r = None if g_zq is None else g_zq[rows][r]
            a = g_q[k] if g_r is None else (g_r * c_k).sum(1) + g_q[k]
            a -= a.new_zeros(n).index_put_((r[win],), a[win])[r]  # from the row's likeliest code's: a − Σp·a exact
            G = p * (a - a.new_zeros(n).index_add_(0, r, p * a)[r])
            g_z[rows] = g_z.new_zeros(n, z.shape[1]).index_add_(0, r, G[:, None] * c_k)
            g_c.index_add_(0, k, 2 * beta * G[:, None] * z[rows][r] + (0 if g_r is None else p[:, None] * g_r))
            g_logit_sum.index_add_(0, k, G)
        for i, rows in enumerate(row_chunks(z, codebook) if ctx.parts is None else []):
            z_c = z[rows]
            if kept:
                p = kept[i]
            else:                                                                  # (K, n), recomputed
                p = torch.softmax(ba_logits(z_c, codebook, log_q, beta, c2, codes_first=True), dim=0)
            if g_zq is None:
                G = p * (g_q.unsqueeze(1) - g_q @ p)                               # dL/dlogits with dL/dp = g_Q/N
            else:
                g_c += mm(p, g_zq[rows])                                           # from z_q_soft = pᵀ @ C
                a = mm(codebook, g_zq[rows].t()).add_(g_q.unsqueeze(1))            # dL/dp (K, n)
                G = a.sub_(torch.linalg.vecdot(p, a, dim=0)).mul_(p)               # dL/dlogits, in a's memory
            g_z[rows] = mm(G.t(), codebook)
            g_c += mm(G, 2 * beta * z_c)
            g_logit_sum += G.sum(1)
        g_z.mul_(2 * beta)
        g_c.addcmul_(codebook, g_logit_sum.unsqueeze(1), value=-2 * beta)
        g_log_q = g_logit_sum if ctx.needs_input_grad[2] else None  # logits = log Q(k) + …: dL/dlog Q = Σ_n G
        return g_z, g_c, g_log_q, None, None, None


@register("ba_vq")
class BAVQ(CodebookQuantizer):
    """Blahut–Arimoto soft quantizer (Blahut 1972; Arimoto 1972), β annealed as in deterministic
    annealing (Rose 1998). Per forward, `ba_iters` alternations of E: p(k|e) = softmax_k ba_logits =
    softmax_k(log Q(k) − β·‖e − c_k‖²) and M: Q(k) = mean_n p(k|e_n), from a uniform Q or a running
    marginal (the rate term). Loss: commitment, codebook (codes moved by gradient), and −H(Q). The
    iterations before the last run without autograd (Q a fixed prior, as in EM) unless
    ba_grad_through_iters. Evaluation: the hard argmax_k ba_logits with Q the prior (ba_eval batch: Q
    after the iterations on the validation batch). With beta_units relative or critical every step runs
    on e/√σ and c/√σ: relative σ is the mean squared distance of a latent to its code, critical σ is
    2·λ_max of the latents' covariance (β = 1: where the assignment first stops being one code for all)."""

    options = CodebookQuantizer.options + (
        "beta_start", "beta_end", "beta_units", "ba_iters", "ba_prior", "ba_reseed_prior", "entropy_weight",
        "codebook_weight", "ba_codebook_update", "ba_output", "ba_fast_path", "ba_grad_through_iters", "ba_eval")

    @classmethod
    def check(cls, cfg) -> None:
        update = cfg.ba_codebook_update
        if cfg.dead_code_threshold > 0 and update != "ema":
            raise VQVAEError("dead_code_threshold needs an EMA codebook: with ba_vq, ba_codebook_update ema")
        if cfg.codebook_weight != DEFAULTS["codebook_weight"] and update == "ema":
            raise VQVAEError("codebook_weight weighs the codebook's gradient; with ba_codebook_update ema codes move by EMA only")
        if cfg.ema_decay != DEFAULTS["ema_decay"] and update == "grad":
            raise VQVAEError("ema_decay applies to EMA codebooks; with ba_codebook_update grad codes move by gradient only")
        if cfg.ba_reseed_prior != "keep" and not (cfg.ba_prior == "running" and cfg.dead_code_threshold > 0):
            raise VQVAEError("ba_reseed_prior uniform needs a prior to reset and codes to re-seed: "
                             "ba_prior running and dead_code_threshold > 0")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and (cfg.ba_grad_through_iters or cfg.ba_eval == "batch"):
            raise VQVAEError("ba_grad_through_iters and ba_eval batch run in one process only (their batch marginals "
                             "are not made data-parallel); launch without torchrun")

    def __init__(self, cfg: Config):
        super().__init__(cfg, ema=cfg.ba_codebook_update == "ema")
        self.beta = cfg.beta_start  # a Python float set by before_step; saved via extra state
        self.beta_start, self.beta_end = cfg.beta_start, cfg.beta_end
        self.ba_iters, self.prior_mode, self.reseed_prior = cfg.ba_iters, cfg.ba_prior, cfg.ba_reseed_prior
        self.commitment_weight, self.codebook_weight = cfg.commitment_weight, cfg.codebook_weight
        self.entropy_weight, self.output = cfg.entropy_weight, cfg.ba_output
        self.centroid_ema, self.fast_path = cfg.ba_codebook_update == "grad_ema", cfg.ba_fast_path
        self.grad_through_iters, self.eval_rule, self.beta_units = cfg.ba_grad_through_iters, cfg.ba_eval, cfg.beta_units
        self.register_buffer("prior", torch.full((cfg.codebook_size,), 1.0 / cfg.codebook_size))
        self.register_buffer("distance_scale", torch.ones(()))  # σ; measured at the first training step
        self.scale_measured = False

    def get_extra_state(self):
        return {"beta": self.beta, "scale_measured": self.scale_measured}

    def set_extra_state(self, state):
        self.beta, self.scale_measured = state["beta"], state["scale_measured"]

    def before_step(self, step: int, total_steps: int) -> None:
        """β's cosine schedule: β_start + (β_end − β_start)·½(1 − cos πt), t from 0 at the first step to 1 at the last."""
        t = step / max(total_steps - 1, 1)
        self.beta = self.beta_start + (self.beta_end - self.beta_start) * 0.5 * (1 - math.cos(math.pi * t))

    def log_values(self) -> dict:
        return {"beta": self.beta}

    @torch.no_grad()
    def batch_scale(self, z: torch.Tensor, codebook: torch.Tensor, idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """This (global) batch's measure of σ, a 0-d tensor, from z (N, D): relative, the mean squared
        distance to the codes idx (N,) (the nearest codes when idx is None); critical, 2·λ_max of
        the covariance of z."""
        if self.beta_units == "critical":
            n = all_reduce_(z.new_tensor(float(z.shape[0])))
            mean = all_reduce_(z.sum(0)) / n                                    # (D,)
            cov = all_reduce_(z.t() @ z) / n - torch.outer(mean, mean)         # (D, D)
            with host_math():  # float64 eigvalsh, which MPS lacks
                return 2 * torch.linalg.eigvalsh(cov.cpu().double())[-1].float().to(z.device)
        idx = nearest_code(z, codebook) if idx is None else idx
        d = (z - codebook[idx]).pow(2).sum(1).mean()
        return all_reduce_(d.clone()) / world()[1]

    def distance_unit(self, z: torch.Tensor, codebook: torch.Tensor) -> Optional[torch.Tensor]:
        """1/√σ (0-d) with beta_units relative or critical, else None; σ is first set at the first training step."""
        if self.beta_units == "absolute":
            return None
        if not self.scale_measured:
            d = self.batch_scale(z, codebook)
            if not self.training:
                return d.clamp_min(1e-12).rsqrt()
            self.distance_scale.copy_(d)
            self.scale_measured = True
        return self.distance_scale.clamp_min(1e-12).rsqrt()

    @staticmethod
    def in_units(z: torch.Tensor, codebook: torch.Tensor, unit: Optional[torch.Tensor]) -> tuple:
        """z and codebook measured in units of √σ (unchanged with absolute β)."""
        return (z, codebook) if unit is None else (z * unit, codebook * unit)

    def log_prior(self) -> torch.Tensor:
        """log Q (K,) at the start of a forward; the running prior floored at PRIOR_FLOOR, so a code can come back."""
        if self.prior_mode == "running":
            return self.prior.clamp_min(PRIOR_FLOOR).log()
        return torch.full_like(self.prior, -math.log(self.codebook_size))

    @torch.no_grad()
    def reseed_dead_codes(self, z: torch.Tensor) -> torch.Tensor:
        """CodebookQuantizer.reseed_dead_codes; with ba_reseed_prior uniform a re-seeded code also
        restarts at the prior share 1/K (then Q is renormalised), instead of entering the E-step with
        the share it decayed to while it won nothing."""
        dead = super().reseed_dead_codes(z)
        if self.reseed_prior == "uniform":
            self.prior.masked_fill_(dead, 1.0 / self.codebook_size)
            self.prior.div_(self.prior.sum())
        return dead

    def prior_after_iterations(self, z: torch.Tensor, codebook: torch.Tensor, grad: bool = False) -> torch.Tensor:
        """log Q after ba_iters − 1 E/M iterations on z (N, D), in the log domain, accumulated over row
        chunks. With grad, autograd records the iterations (gradient through every E/M step), else
        they run without it, on the fast path through iteration_mass. Never screened: each M-step
        multiplies a code's share by its likelihood ratio, so a share below the screen's tolerance can
        grow back (e^−33 to 3·10⁻⁴ in two iterations at β = 3, in a test), and dropping it would move
        the fixed point."""
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            log_q, c2 = self.log_prior(), codebook.pow(2).sum(1)
            for _ in range(self.ba_iters - 1):
                if self.fast_path and not torch.is_grad_enabled():
                    log_q = ba_m_step(iteration_mass(z, codebook, log_q, self.beta, c2).log(), z.shape[0])
                    continue
                log_mass = torch.full_like(log_q, -math.inf)                     # log Σ_n p(k|e_n)
                for rows in row_chunks(z, codebook):
                    log_p = torch.log_softmax(ba_logits(z[rows], codebook, log_q, self.beta, c2), 1)
                    log_mass = torch.logaddexp(log_mass, torch.logsumexp(log_p, 0))
                log_q = ba_m_step(log_mass, z.shape[0])
            return log_q

    def hard_codes(self, z: torch.Tensor, unit: Optional[torch.Tensor], log_q: torch.Tensor) -> torch.Tensor:
        """argmax_k ba_logits (N,); the fast path: the nearest code under the bias σ·log Q(k)/β (uniform Q: none)."""
        if self.fast_path:
            uniform = self.eval_rule == "prior" and self.prior_mode == "uniform"
            sigma = 1.0 if unit is None else unit.pow(-2)
            return nearest_code(z, self.codebook, None if uniform else log_q * sigma / self.beta)
        z_in, codebook_in = self.in_units(z, self.codebook, unit)
        idx = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
        for rows in row_chunks(z, self.codebook):
            idx[rows] = argmax_rows(ba_logits(z_in[rows], codebook_in, log_q, self.beta))
        return idx

    def forward(self, z_e):
        with torch.autocast(z_e.device.type, enabled=False):
            z = flatten_latents(z_e).float()                                     # (N, D)
            shape = (z_e.shape[0], *z_e.shape[2:])
            unit = self.distance_unit(z, self.codebook)                          # 1/√σ, or None
            if not self.training:
                with torch.no_grad():
                    batch = self.eval_rule == "batch"
                    log_q = self.prior_after_iterations(*self.in_units(z, self.codebook, unit)) if batch else self.log_prior()
                    idx = self.hard_codes(z, unit, log_q)
                z_q = F.embedding(idx, self.codebook)
                losses = {"commitment": self.commitment_weight * F.mse_loss(z, z_q)}
                return unflatten_latents(z_q, z_e), losses, idx.view(shape)
            # with an EMA codebook, autograd must see a snapshot: the EMA changes the codebook in place
            codebook = self.codebook.clone() if self.ema or self.centroid_ema else self.codebook
            z_in, codebook_in = self.in_units(z, codebook, unit)
            log_q = self.prior_after_iterations(z_in, codebook_in, grad=self.grad_through_iters)  # (K,)
            e_step = BAEStep.apply if self.fast_path else ba_e_step
            z_q, Q, idx, sums = e_step(z_in, codebook_in, log_q, self.beta, self.output != "soft",
                                       self.ema or self.centroid_ema)
            if unit is not None:  # back from units of √σ
                z_q, sums = z_q / unit, sums / unit
                self.distance_scale.lerp_(self.batch_scale(z.detach(), self.codebook, idx), 1 - SCALE_DECAY)
            entropy = -(Q * Q.clamp_min(1e-30).log()).sum()                      # H(Q), nats
            if self.entropy_weight == 0:  # no gradient through p(k|e) that would be multiplied by 0
                entropy = entropy.detach()
            losses = {"commitment": self.commitment_weight * F.mse_loss(z, z_q.detach()),
                      "entropy": -self.entropy_weight * entropy}
            mass = Q.detach() * (z.shape[0] * world()[1])                       # (K,) global soft counts
            if self.ema:
                self.ema_update(mass, sums, z.detach())
            elif self.codebook_weight > 0:  # at 0, codes move by the entropy term alone, and z_q gets no gradient
                losses["codebook"] = self.codebook_weight * F.mse_loss(z.detach(), z_q)
            if self.centroid_ema:  # on top of the gradient: a direct step toward each code's soft centroid
                with torch.no_grad():
                    self.codebook.lerp_(sums / mass.clamp_min(1e-6).unsqueeze(1), 1 - self.ema_decay)
            if self.prior_mode == "running":
                with torch.no_grad():
                    self.prior.lerp_(Q, 1 - PRIOR_DECAY)
            if self.output == "hard_ste":  # the decoder's gradient reaches the encoder unchanged, as in vq_ema
                z_q = z + (z_q - z).detach()
            return unflatten_latents(z_q, z_e), losses, idx.view(shape)


@register("fsq")
class FSQ(Quantizer):
    """Finite scalar quantization (Mentzer et al. 2023): no codebook to learn or lose. A 1×1 projection to
    one channel per level count L_i; channel i bounded by tanh and rounded to the nearest of L_i evenly
    spaced levels on [−1, 1] (straight-through gradient); a 1×1 projection back to D channels. The index
    is the mixed-radix number of the levels, K = Π L_i, so every metric applies unchanged. No loss."""

    options = ("fsq_levels",)

    @classmethod
    def check(cls, cfg) -> None:
        if not cfg.fsq_levels or min(cfg.fsq_levels) < 2 or math.prod(cfg.fsq_levels) > 2**31:
            raise VQVAEError(f"fsq_levels must list integers ≥ 2 whose product is at most 2^31, got {cfg.fsq_levels}")

    @classmethod
    def num_codes(cls, cfg) -> int:
        return math.prod(cfg.fsq_levels)

    def __init__(self, cfg: Config):
        super().__init__()
        levels = torch.tensor(cfg.fsq_levels)
        self.codebook_size = self.num_codes(cfg)
        self.register_buffer("levels", levels.float(), persistent=False)                     # (d,)
        self.register_buffer("radix", torch.cumprod(torch.cat([levels.new_ones(1), levels[:-1]]), 0), persistent=False)
        self.project_in = nn.Linear(cfg.latent_dim, len(levels))
        self.project_out = nn.Linear(len(levels), cfg.latent_dim)

    def digits_of(self, idx: torch.Tensor) -> torch.Tensor:
        """indices (N,) → each channel's level number (N, d), in [0, L_i)."""
        return idx.unsqueeze(1) // self.radix % self.levels.long()

    def level_values(self, digits: torch.Tensor) -> torch.Tensor:
        """level numbers (N, d) → the values on [−1, 1] the decoder side sees."""
        return digits * 2 / (self.levels - 1) - 1

    def forward(self, z_e):
        with torch.autocast(z_e.device.type, enabled=False):
            bounded = torch.tanh(self.project_in(flatten_latents(z_e).float()))          # (N, d) in (−1, 1)
            digits = ((bounded + 1) * (self.levels - 1) / 2).round()                     # (N, d) in {0, …, L−1}
            q = bounded + (self.level_values(digits) - bounded).detach()                 # straight-through
            idx = (digits.long() * self.radix).sum(1)                                    # (N,) mixed radix
            z_q = self.project_out(q)                                                    # (N, D)
            return unflatten_latents(z_q, z_e), {}, idx.view(z_e.shape[0], *z_e.shape[2:])


def make_quantizer(cfg: Config) -> Quantizer:
    if cfg.quantizer not in QUANTIZERS:
        raise VQVAEError(f"quantizer: unknown value '{cfg.quantizer}'; choose from {', '.join(QUANTIZERS)}")
    return QUANTIZERS[cfg.quantizer](cfg)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


class VQVAE(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.encoder = make_encoder(cfg.arch, cfg.n_hid, cfg.latent_dim)
        self.quantizer = make_quantizer(cfg)
        self.decoder = make_decoder(cfg.arch, cfg.n_hid, cfg.latent_dim)
        self.pixel_range = cfg.pixel_range  # what normalize() must give this model
        self.latent_norm = cfg.latent_norm

    def encode(self, x):
        """x → z_e (B, D, 8, 8), the quantizer's input (with latent_norm l2, each D-vector of unit length)."""
        z_e = self.encoder(x)
        return F.normalize(z_e, dim=1) if self.latent_norm == "l2" else z_e

    def forward(self, x):
        """x (B, 3, 32, 32) in the model's pixel range → x_hat, {loss name: scalar}, indices (B, 8, 8)."""
        z_e = self.encode(x)
        z_q, losses, idx = self.quantizer(z_e)
        x_hat = self.decoder(z_q)
        return x_hat, {"recon": F.mse_loss(x_hat.float(), x), **losses}, idx


def build_model(cfg: Config, device: torch.device) -> VQVAE:
    """The model on its device, in the configured memory layout, optionally compiled."""
    model = VQVAE(cfg).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:  # in place, so state_dict keys stay the same; the quantizer stays eager
        model.encoder.compile()
        model.decoder.compile()
    return model


def data_parallel(model: VQVAE, device: torch.device) -> nn.Module:
    """The module training calls: the model; data-parallel, the model with every parameter and buffer set
    to rank 0's (DDP skips parameters without gradient) in DDP, which averages gradients. The quantizers
    keep their buffers equal by all-reducing their statistics, so DDP broadcasts no buffers."""
    if world()[1] == 1:
        return model
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            broadcast_(t)
    ddp = nn.parallel.DistributedDataParallel
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                      else {"broadcast_buffers": False})  # the keyword was renamed in recent PyTorch
    return ddp(model, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync)


def make_optimizer(model: VQVAE, cfg: Config) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                             weight_decay=cfg.weight_decay)


# ---------------------------------------------------------------------------------------------
# Metrics: pure functions on tensors
# ---------------------------------------------------------------------------------------------


def code_histogram(indices: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """How often each code was chosen, (K,) int64."""
    return torch.bincount(indices.flatten(), minlength=codebook_size)


def perplexity(counts: torch.Tensor) -> float:
    """exp(entropy of the code histogram): K when codes are used uniformly, 1 when one code is."""
    with host_math():
        p = counts.cpu().double() / counts.sum().item()
        p = p[p > 0]
        return math.exp(-(p * p.log()).sum().item())


def usage_rate(counts: torch.Tensor) -> float:
    """Fraction of codes used at least once."""
    return int((counts > 0).sum()) / counts.numel()


def codebook_metrics(counts: torch.Tensor) -> dict:
    used = int((counts > 0).sum().item())
    return {"perplexity": perplexity(counts), "usage_rate": usage_rate(counts), "dead_codes": counts.numel() - used}


def psnr(mse: float, peak: float = 1.0) -> float:
    """10·log10(peak² / mse) in dB; inf for a perfect reconstruction."""
    return 10 * math.log10(peak**2 / mse) if mse > 0 else math.inf


def reconstruction_metrics(sse_pm1: float, n_values: int) -> dict:
    """From the summed squared error of [−1, 1] tensors: mse in [0, 1] pixel space, psnr on that
    scale, and psnr_legacy = 10·log10(1 / MSE in [−1, 1]) as the original documents computed it,
    which is psnr − 20·log10(2) ≈ psnr − 6.02 dB."""
    mse_pm1 = sse_pm1 / n_values
    return {"mse": mse_pm1 / 4, "psnr": psnr(mse_pm1 / 4), "psnr_legacy": psnr(mse_pm1)}


def rate_metrics(train_counts: torch.Tensor, val_counts: torch.Tensor, latents_per_image: int) -> dict:
    """The rate an entropy coder fitted on the training codes would spend: bits_per_index, the cross-entropy
    (bits) of the validation codes (K,) under the training codes' marginal (K,) with add-one smoothing (an
    unseen code costs log2(n_train + K)); entropy_bits, log2 of the validation perplexity (test-on-test);
    bits_per_pixel, bits_per_index × latents per image / 32×32 pixels."""
    with host_math():
        train, val = train_counts.cpu().double(), val_counts.cpu().double()
        bits = (-(val * ((train + 1) / (train.sum() + train.numel())).log2()).sum() / val.sum()).item()
    return {"bits_per_index": bits, "entropy_bits": math.log2(perplexity(val_counts)),
            "bits_per_pixel": bits * latents_per_image / IMAGE_SIZE**2}


def batch_average_metrics(sse_pm1: torch.Tensor, counts: torch.Tensor, values_per_batch: int) -> dict:
    """The published study's convention, each metric per validation batch, then averaged: from sse_pm1
    (n,), each batch's squared error on [−1, 1], and counts (n, K), the sums over the n batches of
    psnr_batch ([0, 1] pixels), perplexity_batch, usage_batch, and n, for the caller to add up and divide
    (in float64 on the host). A batch mean of PSNR is above the PSNR of the mean error (Jensen)."""
    with host_math():
        sse_pm1, counts = sse_pm1.cpu(), counts.cpu()
        mse = sse_pm1.double() / values_per_batch / 4                               # (n,) in [0, 1] pixels
        p = counts.double() / counts.sum(1, keepdim=True)                           # (n, K)
        entropy = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(1)       # (n,) nats
        return {"psnr_batch": (-10 * mse.log10()).sum(), "perplexity_batch": entropy.exp().sum(),
                "usage_batch": (counts > 0).double().mean(1).sum(),
                "batches": torch.tensor(float(len(mse)), dtype=torch.float64)}


# ---------------------------------------------------------------------------------------------
# Checkpoints and results files (W&B: wandb_log.py)
# ---------------------------------------------------------------------------------------------

RESULT_FILES = ("config.yaml", "history.jsonl", "final_metrics.json", "final_model.pt", "last.pt", "recon.png",
                "code_counts.json")


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.out_dir) / cfg.name


def prepare_run_dir(cfg: Config, resume: bool, overwrite: bool) -> Path:
    """The experiment directory, refusing to write over earlier results unless asked to; it is made when
    the run has its data and model (start_or_restore), so a failed start leaves nothing behind."""
    run_dir = run_dir_of(cfg)
    existing = [f for f in RESULT_FILES if (run_dir / f).exists()]
    if resume:
        if not (run_dir / "last.pt").is_file():
            raise VQVAEError(f"--resume: no checkpoint {run_dir / 'last.pt'} to resume from")
    elif existing and not overwrite:
        raise VQVAEError(f"{run_dir} already holds results ({', '.join(existing)}); pass --resume to continue "
                         f"that run, --overwrite to replace it, or choose another --name")
    elif existing:
        for path in run_dir.glob("checkpoint_epoch*.pt"):
            path.unlink()
        for f in existing:
            (run_dir / f).unlink()
    return run_dir


def rng_states(device: torch.device) -> dict:
    """CPU, NumPy and Python RNG states, and the device's (dead-code re-seeding draws from its default generator)."""
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type in ("cuda", "mps"):  # torch.cuda / torch.mps: the current device's state
        states[device.type] = getattr(torch, device.type).get_rng_state()
    return states


def set_rng_states(states: dict, device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if device.type in states:
        getattr(torch, device.type).set_rng_state(states[device.type])


def _read_checkpoint(path: Path, weights_only: bool = False) -> tuple[Optional[dict], str]:
    """(the checkpoint's contents, "") or, when the file is missing, truncated or corrupt, (None, why).
    A full checkpoint holds NumPy and Python RNG states, which only a full unpickle reads: this
    project reads those only from its own run directories, to resume."""
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only), ""
    except Exception as e:
        first = re.sub(r"\x1b\[[0-9;]*m", "", str(e).splitlines()[0]) if str(e) else ""  # no terminal colours
        return None, f"{type(e).__name__}: {first}"


def load_checkpoint(path: Path) -> dict:
    """A checkpoint, or a one-line error naming the file and the newest readable checkpoint beside it."""
    state, reason = _read_checkpoint(path)
    if state is not None:
        return state
    others = sorted(path.parent.glob("checkpoint_epoch*.pt"), key=lambda p: -int(re.sub(r"\D", "", p.stem) or 0))
    good = next(((p, s) for p in [path.parent / "last.pt"] + others if p != path and p.is_file()
                 for s in [_read_checkpoint(p)[0]] if s is not None and "optimizer" in s), None)
    hint = (f"; the newest readable checkpoint is {good[0]} (step {good[1]['step']}): copy it to "
            f"{path.parent / 'last.pt'} to resume from there" if good else "; no other readable checkpoint in that directory")
    raise VQVAEError(f"cannot read checkpoint {path} ({reason}){hint}")


def read_model_state(path, trusted: bool = False) -> dict:
    """The saved state of a trained model: final_model.pt read weights-only (no code can run: a shared
    model is safe to open); with trusted=True a full checkpoint such as last.pt (its RNG states need a
    full unpickle: your own runs only), optimizer state included."""
    path = Path(path)
    if trusted:
        return load_checkpoint(path)
    state, reason = _read_checkpoint(path, weights_only=True)
    if state is None:
        raise VQVAEError(f"cannot read {path} weights-only ({reason}); if it is a full checkpoint you made "
                         f"yourself, load it with load_model(path, trusted=True)")
    return state


def load_model(path, device="cpu", trusted: bool = False) -> VQVAE:
    """A trained model from final_model.pt, in eval mode, read weights-only (no code can run: a shared
    model is safe to open). last.pt holds RNG states that need a full unpickle: trusted=True for your own."""
    state = read_model_state(path, trusted)
    model = VQVAE(load_config(base=state["config"]))
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def _record_step(line: str) -> float:
    """The step of one history line; inf for a line torn by a kill mid-write (dropped on resume)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def truncate_history(path: Path, last_step: int) -> None:
    """On resume, drop the records written after the checkpoint (and a line torn by a kill)."""
    if path.is_file():
        keep = [line for line in path.read_text().splitlines()
                if line and _record_step(line) <= last_step]
        atomic_write_bytes(path, ("\n".join(keep) + "\n" if keep else "").encode())


class History:
    """history.jsonl: one JSON object per logged train step and per validation; mirrored to W&B."""

    def __init__(self, path: Optional[Path], wandb_run):
        self.file = open(path, "a") if path is not None else None  # None: a process that writes nothing
        self.wandb_run = wandb_run

    def log(self, split: str, step: int, epoch: int, metrics: dict) -> None:
        if self.file is None:
            return
        record = {"split": split, "step": step, "epoch": epoch, **metrics}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.wandb_run.log({f"{split}/{k}": v for k, v in metrics.items()} | {"epoch": epoch}, step=step)

    def log_media(self, step: int, make_grid, counts: torch.Tensor) -> None:
        """W&B only (the files hold both): the reconstruction grid (make_grid() costs a forward pass, so it
        runs only then) and the histogram of the validation latents per code (dead codes pile up at 0)."""
        if self.file is not None and not isinstance(self.wandb_run, NoWandb):
            self.wandb_run.log_media(step, make_grid(), counts)

    def close(self):
        if self.file is not None:
            self.file.close()


def recon_grid(model: VQVAE, x_uint8: torch.Tensor, n: int = 8) -> np.ndarray:
    """n validation originals (top row) above their hard-code reconstructions: an RGB uint8 image (H, W, 3)."""
    from torchvision.utils import make_grid

    was_training = model.training
    model.eval()
    with torch.no_grad():
        x = normalize(x_uint8[:n], model.pixel_range)
        x_hat = model(x)[0].float()
    model.train(was_training)
    grid = make_grid(to_unit_range(torch.cat([x, x_hat]), model.pixel_range).clamp(0, 1), nrow=x.shape[0], padding=2)
    return grid.mul(255).round().byte().permute(1, 2, 0).cpu().numpy()


def save_recon_grid(model: VQVAE, x_uint8: torch.Tensor, path: Path, n: int = 8) -> None:
    """recon.png: the reconstruction grid of the first n validation images."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(recon_grid(model, x_uint8, n)).save(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())


# ---------------------------------------------------------------------------------------------
# Evaluate and train
# ---------------------------------------------------------------------------------------------


def autocast_for(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def train_step(model: VQVAE, optimizer: torch.optim.Optimizer, x: torch.Tensor, precision: str):
    """One optimizer step on batch x → loss terms, codes and gradient norm, none read back."""
    with autocast_for(x.device, precision):
        x_hat, losses, idx = model(x)
    loss = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    optimizer.step()
    return losses, idx, grad_norm


class FiniteGuard:
    """Keeps, on the device, the first step at which a loss term or the gradient norm was NaN or inf and
    its values; check(), on logging steps and before every checkpoint, stops the run: no checkpoint
    follows a non-finite step."""

    def __init__(self, device: torch.device):
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.values, self.names = None, []

    def watch(self, step: int, losses: dict, grad_norm: torch.Tensor) -> None:
        values = torch.stack([v.detach().float() for v in losses.values()] + [grad_norm.detach().float()])
        bad = ~torch.isfinite(values).all() & (self.first_bad < 0)
        self.first_bad = torch.where(bad, step, self.first_bad)
        self.values = values if self.values is None else torch.where(bad, values, self.values)
        self.names = list(losses) + ["grad_norm"]

    def check(self, last_good: str) -> None:
        step = int(all_reduce_(self.first_bad.clone(), "max").item())  # every process stops together
        if step >= 0:
            terms = ", ".join(f"{n} {v:.4g}" for n, v in zip(self.names, self.values.tolist()))
            raise RunStopped(f"non-finite value at step {step} ({terms}); stopped. {last_good} "
                             f"(--detect_anomaly finds the operation that made it; a lower --lr often helps)", 3)


class StopSignals:
    """While active, SIGINT/SIGTERM only set `received` (the loop writes last.pt and stops); a second stops at once."""

    def __init__(self):
        self.received, self.previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step and writing last.pt "
              f"(send it again to stop at once)", flush=True)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


@torch.no_grad()
def evaluate(model: VQVAE, x_uint8: torch.Tensor, batch_size: int, precision: str = "fp32", counts_out: list = None) -> dict:
    """Validation over the whole set with the hard code. Dataset level (ours): mse, psnr, psnr_legacy and
    the codebook metrics of all codes. Batch level (the published convention): psnr_batch,
    perplexity_batch, usage_batch over the full batches of batch_size. Data-parallel, each process
    passes its share and the sums are added up. counts_out, a list, receives the histogram (K,)."""
    was_training = model.training
    model.eval()
    device = x_uint8.device
    K = model.quantizer.codebook_size
    batch_sse, batch_counts = [], []  # per batch, kept on the device until the end
    to_signed = 4.0 if model.pixel_range == "unit" else 1.0  # squared error on [0, 1] → on [−1, 1]
    for start in range(0, len(x_uint8), batch_size):
        x = normalize(x_uint8[start:start + batch_size], model.pixel_range)
        with autocast_for(device, precision):
            x_hat, _, idx = model(x)
        batch_sse.append((x_hat.float() - x).pow(2).sum())                          # fp32 on the device
        batch_counts.append(code_histogram(idx, K))
    model.train(was_training)
    batch_counts = torch.stack(batch_counts)                                         # (n_batches, K) int64
    counts = all_reduce_(batch_counts.sum(0)).cpu()                                  # (K,)
    n_values = int(all_reduce_(torch.tensor(x_uint8.numel(), device=device)).item())
    with host_math():  # the sums in float64, which MPS lacks
        batch_sse = torch.stack(batch_sse).cpu().double() * to_signed               # (n_batches,) as if on [−1, 1]
        batch_counts = batch_counts.cpu()
        metrics = reconstruction_metrics(all_reduce_host_(batch_sse.sum()).item(), n_values)
        full = len(x_uint8) // batch_size  # batches of exactly batch_size (drop_last)
        per_batch = batch_average_metrics(batch_sse[:full], batch_counts[:full], batch_size * x_uint8[0].numel())
        names = list(per_batch)
        sums = all_reduce_host_(torch.stack([per_batch[n] for n in names])).tolist()
    if counts_out is not None:
        counts_out.append(counts)
    n_batches = sums[names.index("batches")]
    metrics |= {n: v / n_batches if n_batches else math.nan for n, v in zip(names, sums) if n != "batches"}
    return metrics | codebook_metrics(counts)


@torch.no_grad()
def init_codebook_from_data(model: VQVAE, x_train: torch.Tensor, cfg: Config, generator: torch.Generator,
                            x_val: Optional[torch.Tensor] = None):
    """k-means on encoder outputs of random training batches (≥ 4·K vectors; kmeans_val: validation batches)."""
    K = cfg.codebook_size
    if cfg.codebook_init == "kmeans_val":
        images, picks = x_val, torch.arange(len(x_val), device=x_val.device)
    else:
        images = x_train
        picks = torch.randperm(len(x_train), generator=generator, device=generator.device).to(x_train.device)
    vectors, have = [], 0
    for start in range(0, len(images), cfg.batch_size):
        z_e = model.encode(normalize(images[picks[start:start + cfg.batch_size]], cfg.pixel_range))
        vectors.append(flatten_latents(z_e).float())
        have += vectors[-1].shape[0]
        if have >= 4 * K:
            break
    model.quantizer.init_codebook(torch.cat(vectors), cfg.kmeans_iters, generator)


def check_sizes(cfg: Config, n_train: int, latents_per_image: int, n_val: Optional[int] = None) -> None:
    if cfg.batch_size > n_train:
        raise VQVAEError(f"batch_size {cfg.batch_size} is larger than the training set ({n_train} images)")
    source, n = ("validation", n_val) if cfg.codebook_init == "kmeans_val" else ("training", n_train)
    if (QUANTIZERS[cfg.quantizer].init_from_data(cfg) and n is not None
            and n * latents_per_image < cfg.codebook_size):
        raise VQVAEError(f"codebook_init {cfg.codebook_init} needs at least K={cfg.codebook_size} encoder vectors, "
                         f"but the {source} set gives {n * latents_per_image}; use fewer codes or --codebook_init uniform")


def log_train_step(history: History, pbar, step: int, epoch: int, losses: dict, idx: torch.Tensor,
                   quantizer: Quantizer):
    """Where the loop reads a step's values back from the device (besides the non-finite guard's flag)."""
    names = list(losses)
    values = (all_reduce_(torch.stack([losses[n].detach().float() for n in names])) / world()[1]).tolist()
    metrics = dict(zip(names, values)) | {"loss": sum(values)}
    counts = all_reduce_(code_histogram(idx, quantizer.codebook_size)).cpu()  # the global batch's codes
    metrics |= {"perplexity": perplexity(counts), "usage": usage_rate(counts)} | quantizer.log_values()
    history.log("train", step, epoch, metrics)
    pbar.set_postfix(loss=f"{metrics['loss']:.4f}", ppl=f"{metrics['perplexity']:.1f}", usage=f"{metrics['usage']:.2f}")


def resume_command(cfg: Config) -> str:
    return f"python train.py --out_dir {shlex.quote(cfg.out_dir)} --name {shlex.quote(cfg.name)} --resume"


def start_distributed(cfg: Config) -> tuple[torch.device, bool]:
    """This process's device and whether this call joined a process group (and must leave it).
    Under torchrun (WORLD_SIZE > 1) it joins the group: NCCL with one GPU per process (LOCAL_RANK),
    or gloo on CPU."""
    device = pick_device(cfg.device)
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or dist.is_initialized():
        return device, False
    if device.type not in ("cpu", "cuda"):
        raise VQVAEError(f"multi-process training runs on CUDA (NCCL) or CPU (gloo), not {device.type}")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, True


# Where a run's wall time goes, summed over its sessions (final_metrics.json "seconds"): setting up
# (data, model, W&B), k-means seeding of the codebook, training steps (logging steps included),
# validation passes, checkpoint writes, and the final files.
PHASES = ("setup", "kmeans", "steps", "validation", "checkpoints", "results")


class TrainState:
    """What a run carries besides model and optimizer, saved in checkpoints so --resume continues bitwise."""

    def __init__(self, cfg: Config, device: torch.device):
        self.step = 0
        self.seconds = dict.fromkeys(PHASES, 0.0)  # wall time by phase, over all sessions of the run
        self.time_before = 0.0      # wall time of the run's earlier sessions
        self.session_start = time.perf_counter()
        self.data_gen = generator_for(device, cfg.seed)             # data order
        self.augment_gen = generator_for(device, cfg.seed + 2)      # crops, flips (seed + 1: k-means)
        self.epoch_gen_state = None  # data_gen's state when the current epoch drew its permutation
        self.wandb_id = f"{re.sub(r'[^A-Za-z0-9_-]', '-', cfg.name)[:48]}-{os.urandom(4).hex()}"  # no RNG used
        self.device = device

    def wall_time(self) -> float:
        return self.time_before + time.perf_counter() - self.session_start

    @contextlib.contextmanager
    def timed(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - t0

    def epoch_permutation(self, n_images: int, first_step: int) -> torch.Tensor:
        """This epoch's order of the training images; resumed inside an epoch, the same one again."""
        if first_step == 0:
            self.epoch_gen_state = self.data_gen.get_state()
        else:
            self.data_gen.set_state(self.epoch_gen_state)
        return torch.randperm(n_images, generator=self.data_gen, device=self.data_gen.device).to(self.device)

    def state_dict(self) -> dict:
        return {"step": self.step, "seconds": dict(self.seconds), "train_time_s": self.wall_time(),
                "data_gen_state": self.data_gen.get_state(), "augment_gen_state": self.augment_gen.get_state(),
                "epoch_gen_state": self.epoch_gen_state, "rng": rng_states(self.device), "wandb_id": self.wandb_id}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.time_before = state["step"], state["train_time_s"]
        self.seconds |= state["seconds"]
        self.data_gen.set_state(state["data_gen_state"])
        self.augment_gen.set_state(state["augment_gen_state"])
        self.epoch_gen_state = state["epoch_gen_state"]
        set_rng_states(state["rng"], self.device)
        self.wandb_id = state.get("wandb_id", self.wandb_id)


class Checkpointer:
    """Writes full checkpoints (model, optimizer, config and TrainState), only after the non-finite
    guard has agreed that no step was bad, and remembers the newest good one for messages. On
    every process (the guard's check is a collective); rank 0 alone writes."""

    def __init__(self, run_dir: Path, cfg: Config, model: VQVAE, optimizer, state: TrainState, guard: FiniteGuard,
                 steps_per_epoch: int, resumed: bool):
        self.run_dir, self.cfg, self.model, self.optimizer, self.state, self.guard = run_dir, cfg, model, optimizer, state, guard
        self.steps_per_epoch = steps_per_epoch
        self.last_good = (run_dir / "last.pt", state.step) if resumed else None  # (path, step)

    def note(self) -> str:
        if self.last_good is None:
            return "No checkpoint had been written yet."
        return (f"The last good checkpoint is {self.last_good[0]} (step {self.last_good[1]}); "
                f"resume with: {resume_command(self.cfg)}")

    def save(self, name: str) -> None:
        """Everything the rest of the run depends on; a failed write stops the run."""
        self.guard.check(self.note())
        path, step = self.run_dir / name, self.state.step
        with self.state.timed("checkpoints"):
            self.write(path, step)
        if name == "last.pt":
            self.last_good = (path, step)

    def write(self, path: Path, step: int) -> None:
        if world()[0] == 0:
            checkpoint = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                          "config": dataclasses.asdict(self.cfg), "epoch": step // self.steps_per_epoch,
                          "epoch_step": step % self.steps_per_epoch} | self.state.state_dict()
            try:
                atomic_torch_save(checkpoint, path)
            except OSError as e:
                raise RunStopped(f"cannot write checkpoint {path} ({e.strerror or e}); stopped rather than train "
                                 f"on without one. {self.note()}", 4) from None


def agreed_signal(signals: StopSignals, ask: bool, device: torch.device) -> int:
    """The signal that stops the run, or 0; data-parallel, agreed by all processes where `ask` is true."""
    if world()[1] == 1:
        return signals.received or 0
    if not ask:
        return 0
    return int(all_reduce_(torch.tensor(signals.received or 0, device=device), "max").item())


def stopped_by(signum: int, step: int, cfg: Config) -> RunStopped:
    return RunStopped(f"stopped by {signal.Signals(signum).name} at step {step}; last.pt holds that step. "
                      f"Resume with: {resume_command(cfg)}", 128 + signum)


def run_length(cfg: Config, n_train: int) -> tuple[int, int]:
    """(steps per epoch, total steps) of a run."""
    steps_per_epoch = n_train // cfg.batch_size
    total = cfg.epochs * steps_per_epoch
    return steps_per_epoch, min(total, cfg.max_steps) if cfg.max_steps else total


def training_loop(cfg: Config, model: VQVAE, net: nn.Module, optimizer, state: TrainState, x_train, x_val,
                  history: History, checkpoints: Checkpointer, pbar) -> tuple[dict, list]:
    """Train until the last step, validating and checkpointing after every epoch. Returns the last
    validation metrics and the validation code histograms. The epoch's last step is checkpointed
    after its validation, so a resumed run never skips one."""
    rank, n_proc = world()
    steps_per_epoch, total_steps = run_length(cfg, len(x_train))
    device, guard = x_train.device, checkpoints.guard
    val, counts = None, []
    with StopSignals() as signals, torch.autograd.set_detect_anomaly(cfg.detect_anomaly):
        while state.step < total_steps:
            epoch, first = divmod(state.step, steps_per_epoch)
            perm = state.epoch_permutation(len(x_train), first)
            last = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
            t0 = time.perf_counter()
            for i in range(first, last):
                x = get_batch(x_train, perm, i, cfg.batch_size, cfg.channels_last, (rank, n_proc), cfg.pixel_range)
                if cfg.augment == "crop_flip":
                    x = augment_crop_flip(x, state.augment_gen, (rank, n_proc))
                model.quantizer.before_step(state.step, total_steps)
                losses, idx, grad_norm = train_step(net, optimizer, x, cfg.precision)
                state.step += 1
                guard.watch(state.step, losses, grad_norm)
                pbar.update()
                log_step = state.step % cfg.log_every == 0
                if log_step:
                    guard.check(checkpoints.note())
                    log_train_step(history, pbar, state.step, epoch, losses, idx, model.quantizer)
                signum = agreed_signal(signals, log_step, device)
                if i + 1 < last and (signum or (cfg.save_every_steps and state.step % cfg.save_every_steps == 0)):
                    state.seconds["steps"] += time.perf_counter() - t0
                    checkpoints.save("last.pt")
                    t0 = time.perf_counter()
                    if signum:
                        raise stopped_by(signum, state.step, cfg)
            sync(device)
            state.seconds["steps"] += time.perf_counter() - t0
            guard.check(checkpoints.note())
            with state.timed("validation"):
                val = evaluate(model, x_val, cfg.eval_batch_size, cfg.precision, counts_out=counts)
                history.log("val", state.step, epoch, val | model.quantizer.log_values())
                history.log_media(state.step, lambda: recon_grid(model, x_val), counts[-1])
            report_validation(pbar, val, epoch, -(-total_steps // steps_per_epoch), state.step)
            checkpoints.save("last.pt")
            if cfg.checkpoint_freq and (epoch + 1) % cfg.checkpoint_freq == 0:
                checkpoints.save(f"checkpoint_epoch{epoch + 1}.pt")
            signum = agreed_signal(signals, True, device)
            if signum:
                raise stopped_by(signum, state.step, cfg)
    return val, counts


def report_validation(pbar, val: dict, epoch: int, n_epochs: int, step: int) -> None:
    if world()[0] == 0:  # above the progress bar, on a line of its own
        pbar.write(f"epoch {epoch + 1}/{n_epochs} step {step}: psnr {val['psnr']:.2f} dB (batch mean "
              f"{val['psnr_batch']:.2f}), perplexity {val['perplexity']:.1f}, usage {val['usage_rate']:.3f}")


def open_run(cfg: Config, resume: bool, overwrite: bool) -> tuple[Config, Path, Optional[dict]]:
    """The run's config (named, when it had no name), its directory, and the checkpoint to resume
    from; refuses, before any work, what cannot run data-parallel and a resume that would change
    what the checkpoint means."""
    rank, n_proc = world()
    if not cfg.name:
        if resume:
            raise VQVAEError("--resume needs the --name of the run to continue")
        K = QUANTIZERS[cfg.quantizer].num_codes(cfg)
        name = [f"{cfg.quantizer}_K{K}_{cfg.arch}_{time.strftime('%Y%m%d-%H%M%S')}"]
        if n_proc > 1:
            dist.broadcast_object_list(name, src=0)  # rank 0's clock names the run
        cfg = dataclasses.replace(cfg, name=name[0])
    if cfg.batch_size % n_proc:
        raise VQVAEError(f"batch_size {cfg.batch_size} (the global batch) must divide evenly among {n_proc} processes")
    run_dir = prepare_run_dir(cfg, resume, overwrite) if rank == 0 else run_dir_of(cfg)
    if not resume:
        return cfg, run_dir, None
    checkpoint = load_checkpoint(run_dir / "last.pt")
    changed = result_differences(checkpoint["config"], cfg, allow=LENGTH_KEYS)
    if changed:
        raise VQVAEError("cannot resume with a different " + ", ".join(
            f"{k} ({then} in the checkpoint, {now} now)" for k, then, now in changed) + "; only the run's length "
            "(epochs, max_steps) may change on --resume")
    return cfg, run_dir, checkpoint


def start_or_restore(cfg: Config, model: VQVAE, optimizer, state: TrainState, checkpoint: Optional[dict],
                     x_train: torch.Tensor, x_test: torch.Tensor, run_dir: Path) -> None:
    """Restore model, optimizer and TrainState; or, for a new run, seed the codebook and save the config."""
    main = world()[0] == 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        state.load_state_dict(checkpoint)
        if main:
            truncate_history(run_dir / "history.jsonl", state.step)
            print(f"resuming {run_dir} at step {state.step}")
        return
    if type(model.quantizer).init_from_data(cfg):
        with state.timed("kmeans"):
            kmeans_gen = generator_for(x_train.device, cfg.seed + 1)
            init_codebook_from_data(model, x_train, cfg, kmeans_gen, x_test)
            sync(x_train.device)
        if main:
            print(f"k-means codebook init: {state.seconds['kmeans']:.1f}s")
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(run_dir / "config.yaml", config_to_yaml(cfg).encode())


def write_results(cfg: Config, model: VQVAE, state: TrainState, val: dict, counts: list, x_train: torch.Tensor,
                  x_test: torch.Tensor, run_dir: Path, steps_per_epoch: int, history: History) -> dict:
    """Rate metrics (a pass over x_train), final_model.pt, code_counts.json, recon.png, last final_metrics.json."""
    train_counts = []  # the training images' codes under the final model, one pass
    with state.timed("results"):
        evaluate(model, x_train[world()[0]::world()[1]], cfg.eval_batch_size, cfg.precision, counts_out=train_counts)
    rate = rate_metrics(train_counts[0], counts[-1], (IMAGE_SIZE // 4) ** 2)
    history.log("final", state.step, (state.step - 1) // steps_per_epoch, rate)
    final = dict(val) | rate | model.quantizer.log_values()
    steps_s = state.seconds["steps"]
    final |= {"epochs": state.step / steps_per_epoch, "steps": state.step, "train_time_s": state.wall_time(),
              "train_images_per_s": state.step * cfg.batch_size / steps_s if steps_s else float("nan")}
    if world()[0] == 0:
        with state.timed("results"):
            atomic_torch_save({"model": model.state_dict(), "config": dataclasses.asdict(cfg)}, run_dir / "final_model.pt")
            atomic_write_bytes(run_dir / "code_counts.json",
                               (json.dumps({"split": "val", "counts": counts[-1].tolist()}) + "\n").encode())
            save_recon_grid(model, x_test, run_dir / "recon.png")
    final["seconds"] = {k: round(v, 3) for k, v in state.seconds.items()}
    if world()[0] == 0:
        atomic_write_bytes(run_dir / "final_metrics.json", (json.dumps(final, indent=2) + "\n").encode())
        print(f"done: {run_dir} — psnr {final['psnr']:.2f} dB, perplexity {final['perplexity']:.1f}, usage "
              f"{final['usage_rate']:.3f}, {final['bits_per_pixel']:.3f} bits/pixel, {final['train_images_per_s']:.0f} images/s")
    return final


def train_on(cfg: Config, device: torch.device, resume: bool, overwrite: bool) -> dict:
    """One run on this process's device: set up, train (training_loop), write the results."""
    from tqdm import tqdm

    setup_start = time.perf_counter()
    rank, n_proc = world()
    cfg, run_dir, checkpoint = open_run(cfg, resume, overwrite)
    train_np, test_np = load_dataset(cfg)
    check_sizes(cfg, len(train_np), (IMAGE_SIZE // 4) ** 2, len(test_np))
    if rank == 0:
        print(f"config ({run_dir}):\n" + "".join(f"  {line}\n" for line in config_to_yaml(cfg).splitlines()))
        print(f"device {device}" + (f" × {n_proc} processes" if n_proc > 1 else "") +
              f", {len(train_np)} training and {len(test_np)} validation images")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    x_train, x_test = to_device_uint8(train_np, device), to_device_uint8(test_np, device)
    state = TrainState(cfg, device)
    model = build_model(cfg, device)
    optimizer = make_optimizer(model, cfg)
    start_or_restore(cfg, model, optimizer, state, checkpoint, x_train, x_test, run_dir)
    steps_per_epoch, total_steps = run_length(cfg, len(x_train))
    net = data_parallel(model, device)
    wandb_run = start_wandb(cfg, run_dir, resume, state.wandb_id) if rank == 0 else NoWandb()
    history = History(run_dir / "history.jsonl" if rank == 0 else None, wandb_run)
    checkpoints = Checkpointer(run_dir, cfg, model, optimizer, state, FiniteGuard(device), steps_per_epoch,
                               checkpoint is not None)
    pbar = tqdm(total=total_steps, initial=state.step, desc=cfg.name, dynamic_ncols=True, disable=rank != 0)
    x_val = x_test[rank::n_proc]  # this process's share of the validation set
    model.train()
    state.session_start = time.perf_counter()
    # this session's set-up, less k-means (which a new run's start_or_restore timed on its own)
    state.seconds["setup"] += state.session_start - setup_start - (state.seconds["kmeans"] if checkpoint is None else 0)
    try:
        val, counts = training_loop(cfg, model, net, optimizer, state, x_train, x_val, history, checkpoints, pbar)
        if val is None:  # resumed a run that had already finished its steps
            val = evaluate(model, x_val, cfg.eval_batch_size, cfg.precision, counts_out=counts)
        pbar.close()  # before the last lines, so the bar is not drawn again after them
        return write_results(cfg, model, state, val, counts, x_train, x_test, run_dir, steps_per_epoch, history)
    finally:
        pbar.close()
        history.close()
        wandb_run.finish()


def train(cfg: Config, resume: bool = False, overwrite: bool = False) -> dict:
    """Train a VQ-VAE as configured; returns the final metrics, also written to the run directory. Stops
    with RunStopped, a checkpoint kept, on SIGINT/SIGTERM, a non-finite value or a failed checkpoint
    write. Under torchrun each process trains on its share of each global batch; rank 0 writes files."""
    cfg = validate(cfg)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for repeatable matmuls
        torch.use_deterministic_algorithms(True)
    device, joined = start_distributed(cfg)
    try:
        for note in device_caveats(cfg, device, platform.mac_ver()[0]):
            if world()[0] == 0:
                print(f"note: {note}")
        final = train_on(cfg, device, resume, overwrite)
        if joined:
            dist.barrier()  # rank 0 may still be writing results: leave the group together
        return final
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        if joined:
            dist.destroy_process_group()
