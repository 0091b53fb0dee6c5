"""Studies: a set of runs that share a base config, run one after another, and their results table.

    python train.py --sweep sweeps/ba_study.yaml [--seeds N] [--flag value ...]
    python train.py --summarize experiments/ba_study

A sweep file holds the study's name, a base config and the runs as overrides of it:

    study: ba_study                       # results go to <out_dir>/ba_study/<run>/
    base: {arch: small, epochs: 10}       # config keys shared by every run
    runs:
      - {name: baseline, quantizer: vq_ema}
      - {name: ba_default, quantizer: ba_vq, ba_iters: 2}

A run's config is: defaults ← --config YAML ← base ← the run's keys ← flags given beside --sweep;
the base and the flags may set options of several quantizers, and each run takes its own quantizer's.
Finished runs are skipped and interrupted ones resumed, so the same command continues a study.
With --seeds N each run is repeated with seeds s, s+1, …, s+N−1 (s: the configured seed); the
first seed's directory is <run>/, the others' <run>_seed<S>/.

This module also reads studies back (for --summarize, analyze.ipynb and RESULTS.md's figures):
read_study, summarize, the diagnostics of finished runs, make_figures, and the rate–distortion points.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import math
import os
import re
import time
from pathlib import Path

import torch

import vqvae

SWEEP_KEYS = ("study", "base", "runs")
METRICS = ("psnr", "psnr_legacy", "perplexity", "usage_rate", "dead_codes", "psnr_batch", "perplexity_batch",
           "usage_batch", "bits_per_index", "entropy_bits", "bits_per_pixel", "beta", "train_time_s")
SEED_SUFFIX = re.compile(r"_seed(\d+)$")
# The published BA study's final numbers (EXPERIMENT_SUMMARY.md of its repository, commit b7d2839),
# in its own convention: per-batch PSNR ([0, 1] pixels), perplexity and usage of validation batches
# of 128, averaged. Compare them with psnr_batch, perplexity_batch and usage_batch only.
PUBLISHED = {  # run: (psnr_batch dB, perplexity_batch, usage_batch)
    "baseline": (22.34, 283.4, 0.963), "ba_default": (21.86, 54.7, 0.135), "ba_exploratory": (21.95, 100.2, 0.390),
    "ba_greedy": (22.03, 61.7, 0.145), "ba_iters5": (20.33, 25.3, 0.073), "ba_iters1": (22.06, 108.7, 0.366),
    "ba_high_entropy": (22.00, 107.4, 0.370), "ba_low_entropy": (22.16, 135.3, 0.474),
    "ba_high_commitment": (21.88, 54.3, 0.153), "ba_balanced": (21.70, 41.9, 0.101)}


@dataclasses.dataclass
class PlannedRun:
    run: str          # the run's name in the sweep file
    seed: int
    cfg: vqvae.Config

    @property
    def dir(self) -> Path:
        return vqvae.run_dir_of(self.cfg)


# ---------------------------------------------------------------------------------------------
# Reading a sweep file and planning its runs
# ---------------------------------------------------------------------------------------------


def read_sweep(path) -> tuple[str, dict, list]:
    """(study name, base overrides, list of run overrides), each run with a unique `name`."""
    data = vqvae.read_yaml(path)
    for key in data:
        if key not in SWEEP_KEYS:
            raise vqvae.VQVAEError(f"unknown key '{key}' in sweep file {path}{vqvae.nearest_name(key, SWEEP_KEYS)}; "
                                   f"a sweep file holds {', '.join(SWEEP_KEYS)}")
    study, base, runs = data.get("study"), data.get("base") or {}, data.get("runs")
    if not isinstance(study, str) or not re.fullmatch(r"[\w.-]+", study):
        raise vqvae.VQVAEError(f"{path}: 'study' must be a name of letters, digits, '_', '-' or '.', got {study!r}")
    if not isinstance(base, dict):
        raise vqvae.VQVAEError(f"{path}: 'base' must be a mapping of config keys")
    if not isinstance(runs, list) or not runs:
        raise vqvae.VQVAEError(f"{path}: 'runs' must be a non-empty list of mappings, each with a 'name'")
    names = []
    for i, run in enumerate(runs, 1):
        name = run.get("name") if isinstance(run, dict) else None
        if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name) or SEED_SUFFIX.search(name):
            raise vqvae.VQVAEError(f"{path}: run {i} needs a 'name' of letters, digits, '_', '-' or '.' "
                                   f"(not ending in _seed<N>), got {name!r}")
        if name in names:
            raise vqvae.VQVAEError(f"{path}: two runs are named '{name}'")
        names.append(name)
    for where, values in [("base", base)] + [(f"run '{r['name']}'", r) for r in runs]:
        if "out_dir" in values or (where == "base" and "name" in values):
            raise vqvae.VQVAEError(f"{path}: {where} may not set name or out_dir; the sweep places its runs")
    return study, base, runs


def plan_sweep(path, yaml_path=None, flags: dict | None = None, seeds: int = 1,
               only: list | None = None) -> tuple[Path, list[PlannedRun]]:
    """The study directory and every run's resolved config, checked before any run starts. With
    `only` (run names), just those runs of the sweep."""
    if seeds < 1:
        raise vqvae.VQVAEError(f"--seeds must be ≥ 1, got {seeds}")
    flags = dict(flags or {})
    if "name" in flags:
        raise vqvae.VQVAEError("--name cannot be given with --sweep: each run takes its name from the sweep file")
    study, base, runs = read_sweep(path)
    if only:
        names = [r["name"] for r in runs]
        for name in only:
            if name not in names:
                raise vqvae.VQVAEError(f"--runs: {path} has no run '{name}'{vqvae.nearest_name(name, names)}")
        runs = [r for r in runs if r["name"] in only]
    planned = []
    for run in runs:
        cfg = vqvae.Config()
        if yaml_path:
            cfg = vqvae.apply_overrides(cfg, vqvae.read_yaml(yaml_path), str(yaml_path))
        # the base and the flags may set options of several quantizers: each run takes those of its own
        quantizer = flags.get("quantizer", run.get("quantizer", base.get("quantizer", cfg.quantizer)))
        cfg = vqvae.apply_overrides(cfg, vqvae.applicable(base, quantizer), f"{path} base")
        cfg = vqvae.apply_overrides(cfg, {k: v for k, v in run.items() if k != "name"}, f"{path} run '{run['name']}'")
        cfg = vqvae.apply_overrides(cfg, vqvae.applicable(flags, quantizer), "command-line flags")
        cfg = dataclasses.replace(cfg, out_dir=str(Path(cfg.out_dir) / study), wandb_group=cfg.wandb_group or study)
        for i in range(seeds):
            seed = cfg.seed + i
            name = run["name"] if i == 0 else f"{run['name']}_seed{seed}"
            planned.append(PlannedRun(run["name"], seed, vqvae.validate(dataclasses.replace(cfg, seed=seed, name=name))))
    unused = [k for k in flags if all(k not in vqvae.applicable({k: 0}, p.cfg.quantizer) for p in planned)]
    if unused:
        raise vqvae.VQVAEError(f"--{unused[0]} applies to none of the planned runs (their quantizers: "
                               f"{', '.join(sorted({p.cfg.quantizer for p in planned}))})")
    return Path(planned[0].cfg.out_dir), planned


def run_state(run_dir: Path) -> str:
    """done (final metrics written), interrupted (a checkpoint to resume), partial (results of a run
    stopped before its first checkpoint) or new."""
    if (run_dir / "final_metrics.json").is_file():
        return "done"
    if (run_dir / "last.pt").is_file():
        return "interrupted"
    if any((run_dir / f).exists() for f in vqvae.RESULT_FILES):
        return "partial"
    return "new"


def config_differences(run_dir: Path, cfg: vqvae.Config) -> list[str]:
    """Result-changing keys on which the run saved in run_dir differs from cfg (vqvae.result_differences)."""
    saved = vqvae.read_yaml(run_dir / "config.yaml")
    return [f"{k}: {then!r} there, {now!r} now" for k, then, now in vqvae.result_differences(saved, cfg)]


def check_existing(planned: list[PlannedRun]) -> None:
    """Refuse, before any work, to skip or resume a run that was made with other settings."""
    for p in planned:
        if run_state(p.dir) in ("done", "interrupted") and (p.dir / "config.yaml").is_file():
            diff = config_differences(p.dir, p.cfg)
            if diff:
                raise vqvae.VQVAEError(f"{p.dir} holds a run made with other settings ({'; '.join(diff)}); "
                                       f"use another --out_dir, remove that directory, or pass --overwrite to redo "
                                       f"every run of the study")


# ---------------------------------------------------------------------------------------------
# Running a sweep
# ---------------------------------------------------------------------------------------------


def run_sweep(path, yaml_path=None, flags: dict | None = None, seeds: int = 1, overwrite: bool = False,
              only: list | None = None) -> list[dict]:
    """Run every planned run in order (skipping finished ones, resuming interrupted ones), then
    write the study's summary. Returns the summary rows. With `only`, just those runs (the
    study's plan in sweep.json still lists them all)."""
    study_dir, planned = plan_sweep(path, yaml_path, flags, seeds, only)
    if not overwrite:
        check_existing(planned)
    study_dir.mkdir(parents=True, exist_ok=True)
    # the plan, so --summarize knows the runs' order and settings without the sweep file
    study, base, runs = read_sweep(path)
    plan = {"study": study, "sweep_file": str(path), "seeds": [p.seed for p in planned if p.run == planned[0].run],
            "base": base, "runs": runs, "flags": flags or {}}
    main = os.environ.get("RANK", "0") == "0"  # under torchrun, only rank 0 writes the study's files
    if main:
        vqvae.atomic_write_bytes(study_dir / "sweep.json", (json.dumps(plan, indent=2) + "\n").encode())
    # under torchrun, one process group serves every run of the study (joining and leaving it per
    # run races between processes)
    _, joined = vqvae.start_distributed(planned[0].cfg)
    try:
        run_all(planned, overwrite, main)
        if joined:
            vqvae.dist.barrier()
    finally:
        if joined:
            vqvae.dist.destroy_process_group()
    if not main:
        return []
    return summarize(study_dir)


def run_all(planned: list, overwrite: bool, main: bool) -> None:
    t0 = time.perf_counter()
    for i, p in enumerate(planned, 1):
        state = "new" if overwrite else run_state(p.dir)
        if main:
            print(f"\n=== [{i}/{len(planned)}] {p.cfg.name} ({'redo' if overwrite else state}) → {p.dir}", flush=True)
        if state == "done":
            continue
        if state == "partial" and main:
            print(f"{p.dir} holds the files of a run stopped before its first checkpoint; starting it again")
        try:
            vqvae.train(p.cfg, resume=state == "interrupted", overwrite=overwrite or state == "partial")
        except vqvae.RunStopped as e:
            raise vqvae.RunStopped(f"{e} — or run the same --sweep command again to go on with the study",
                                   e.exit_code) from None
    if main:
        print(f"\nstudy {Path(planned[0].cfg.out_dir)}: {len(planned)} runs, this session "
              f"{(time.perf_counter() - t0) / 60:.1f} min")


# ---------------------------------------------------------------------------------------------
# Reading a study back
# ---------------------------------------------------------------------------------------------


def read_code_counts(run_dir) -> torch.Tensor:
    """The final validation histogram of a run's codes, (K,) int64, from code_counts.json."""
    with open(Path(run_dir) / "code_counts.json") as f:
        return torch.tensor(json.load(f)["counts"], dtype=torch.long)


def read_history(run_dir) -> list:
    """history.jsonl of a run as a list of dicts."""
    with open(Path(run_dir) / "history.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def ba_probabilities(quantizer, z: torch.Tensor, codebook=None) -> torch.Tensor:
    """p(k|e) (N, K) of a BA quantizer's last E-step for latents z (N, D), as one matrix (for tests and
    analysis; training never forms it): softmax_k vqvae.ba_logits after its E/M iterations, with its
    codebook or another (K, D)."""
    codebook = quantizer.codebook if codebook is None else codebook
    z, codebook = quantizer.in_units(z, codebook, quantizer.distance_unit(z, codebook))
    log_q = quantizer.prior_after_iterations(z, codebook)
    return torch.softmax(vqvae.ba_logits(z, codebook, log_q, quantizer.beta), dim=1)


def read_study(study_dir) -> list[dict]:
    """One record per run directory of the study: run (its sweep name), seed, dir, state, config
    (dict) and final (final metrics, or None if unfinished); in the sweep's order when the study
    has a sweep.json, else by name."""
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise vqvae.VQVAEError(f"no study directory {study_dir}")
    order = list(sweep_runs(study_dir))
    records = []
    for run_dir in sorted(d for d in study_dir.iterdir() if (d / "config.yaml").is_file()):
        cfg = vqvae.read_yaml(run_dir / "config.yaml")
        state = run_state(run_dir)
        final = json.loads((run_dir / "final_metrics.json").read_text()) if state == "done" else None
        records.append({"run": SEED_SUFFIX.sub("", run_dir.name), "seed": cfg.get("seed"), "dir": run_dir,
                        "state": state, "config": cfg, "final": final})
    if not records:
        raise vqvae.VQVAEError(f"{study_dir} holds no runs (directories with a config.yaml)")
    rank = {name: i for i, name in enumerate(order)}
    records.sort(key=lambda r: (rank.get(r["run"], len(rank)), r["run"], r["seed"]))
    return records


def mean_std(values: list) -> tuple[float, float]:
    """Mean and sample standard deviation (nan for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return mean, std


def sweep_runs(study_dir: Path) -> dict:
    """The runs of the study's sweep.json, by name and in the sweep's order ({} without one)."""
    sweep = study_dir / "sweep.json"
    return {r["name"]: r for r in json.loads(sweep.read_text())["runs"]} if sweep.is_file() else {}


def summary_rows(study_dir, records: list | None = None) -> list[dict]:
    """One row per run of the study: settings, number of finished seeds, and each metric's mean
    and std over those seeds (an unfinished run has seeds 0 and empty metrics). `records`: the
    study's read_study, when the caller has it."""
    study_dir = Path(study_dir)
    records, runs = read_study(study_dir) if records is None else records, sweep_runs(study_dir)
    rows = []
    for run in dict.fromkeys(r["run"] for r in records):
        finished = [r["final"] for r in records if r["run"] == run and r["final"] is not None]
        first = next(r for r in records if r["run"] == run)
        settings = " ".join(f"{k}={v}" for k, v in runs.get(run, {}).items() if k != "name")  # beyond the base
        row = {"run": run, "quantizer": first["config"]["quantizer"], "settings": settings, "seeds": len(finished)}
        for key in METRICS:
            values = [f[key] for f in finished if f.get(key) is not None]
            row[key], row[f"{key}_std"] = mean_std(values) if values else (math.nan, math.nan)
        rows.append(row)
    return rows


def _fmt(value: float, std: float, digits: int, scale: float = 1.0) -> str:
    if math.isnan(value):
        return "—"
    text = f"{value * scale:.{digits}f}"
    return text if math.isnan(std) else f"{text} ± {std * scale:.{digits}f}"


def results_markdown(rows: list[dict], title: str) -> str:
    lines = [f"# {title}", "",
             "Dataset level (ours): psnr in [0,1] pixels over the whole validation set (psnr_legacy = the same "
             "error as 10·log10(1/MSE) on [−1,1] tensors, psnr − 6.02 dB); perplexity, usage and dead codes from "
             "the histogram of all validation codes. Batch level (the published study's convention): psnr_batch "
             "([0,1] pixels), perplexity_batch and usage_batch computed per validation batch of eval_batch_size "
             "and averaged over the full batches. Hard codes throughout. Mean ± sample std over seeds where "
             "there are several.", ""]
    rate = any(not math.isnan(r["bits_per_index"]) for r in rows)  # runs made before the rate metrics have none
    if rate:
        lines += ["Rate: bits/index is the cross-entropy of the validation codes under the training codes' "
                  "marginal (add-one smoothing), what an entropy coder fitted on the training set spends; "
                  "bits/pixel = bits/index × 64 latents / 1,024 pixels.", ""]
    lines += ["| # | run | settings | seeds | psnr (dB) | psnr_legacy (dB) | perplexity | usage (%) | dead codes "
              "| psnr_batch (dB) | perplexity_batch | usage_batch (%) |" + (" bits/index | bits/pixel |" if rate else "")
              + " final β | train time (min) |", "|---" * (16 if rate else 14) + "|"]
    for i, r in enumerate(rows, 1):
        cells = [str(i), r["run"], r["settings"].replace("|", "/") or r["quantizer"], str(r["seeds"]),
                 _fmt(r["psnr"], r["psnr_std"], 2), _fmt(r["psnr_legacy"], r["psnr_legacy_std"], 2),
                 _fmt(r["perplexity"], r["perplexity_std"], 1), _fmt(r["usage_rate"], r["usage_rate_std"], 1, 100),
                 _fmt(r["dead_codes"], r["dead_codes_std"], 0), _fmt(r["psnr_batch"], r["psnr_batch_std"], 2),
                 _fmt(r["perplexity_batch"], r["perplexity_batch_std"], 1),
                 _fmt(r["usage_batch"], r["usage_batch_std"], 1, 100)]
        if rate:
            cells += [_fmt(r["bits_per_index"], r["bits_per_index_std"], 2), _fmt(r["bits_per_pixel"], r["bits_per_pixel_std"], 3)]
        cells += [_fmt(r["beta"], r["beta_std"], 2), _fmt(r["train_time_s"], r["train_time_s_std"], 1, 1 / 60)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summarize(study_dir) -> list[dict]:
    """Write <study_dir>/experiment_results.csv and results.md; returns the rows."""
    study_dir = Path(study_dir)
    records = read_study(study_dir)
    rows = summary_rows(study_dir, records)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    vqvae.atomic_write_bytes(study_dir / "experiment_results.csv", table.getvalue().encode())
    markdown = results_markdown(rows, f"Study {study_dir.name}") + rd_markdown(rd_points(records))
    vqvae.atomic_write_bytes(study_dir / "results.md", markdown.encode())
    print(markdown)
    print(f"wrote {study_dir / 'experiment_results.csv'} and {study_dir / 'results.md'}")
    return rows


def saved_run(run_dir, data_dir=None, device="cpu", split="test"):
    """A finished run's final model (eval mode), its config, and its validation images (or, with
    split "train", its training images; uint8 numpy), found in data_dir when given instead of the
    run's own."""
    run_dir = Path(run_dir)
    model = vqvae.load_model(run_dir / "final_model.pt", device)
    cfg = vqvae.load_config(base=vqvae.read_yaml(run_dir / "config.yaml"),
                            overrides={"data_dir": data_dir} if data_dir else None)
    return model, cfg, vqvae.load_dataset(cfg)[0 if split == "train" else 1]


def model_input(images, n_images: int, pixel_range: str) -> torch.Tensor:
    """The first n images (uint8 numpy, N×32×32×3) as the model takes them, on the CPU."""
    return vqvae.normalize(vqvae.to_device_uint8(images[:n_images], torch.device("cpu")), pixel_range)


def evaluate_saved(run_dir, data_dir=None, beta=None, ba_eval=None, ba_prior=None, device="cpu") -> dict:
    """A finished run's final_model.pt evaluated again on its validation set, as training's last
    validation did (same eval_batch_size, hard codes), optionally with its data found in another
    data_dir or, for BA, with another evaluation: another β (e.g. where another schedule would have
    ended), another ba_eval rule, or another starting marginal (ba_prior: uniform or running)."""
    model, cfg, test = saved_run(run_dir, data_dir, device)
    if ba_eval is not None:
        model.quantizer.eval_rule = ba_eval
    if ba_prior is not None:
        model.quantizer.prior_mode = ba_prior
    if beta is not None:
        model.quantizer.beta = float(beta)
    return vqvae.evaluate(model, vqvae.to_device_uint8(test, torch.device(device)), cfg.eval_batch_size, cfg.precision)


def critical_beta(z: torch.Tensor) -> float:
    """1 / (2·λ_max) for latents z (N, D), λ_max the largest eigenvalue of their covariance: the β
    (absolute units) below which Blahut–Arimoto's only fixed point puts every latent on one code at
    the mean (Rose 1998, deterministic annealing's first critical point)."""
    with vqvae.host_math():
        cov = torch.cov(z.cpu().double().t())
        return 1.0 / (2.0 * torch.linalg.eigvalsh(cov)[-1].item())


def distance_scale(run_dir, n_images: int = 1000, data_dir=None) -> dict:
    """What β competes with in a finished run, on its first n validation images: the median squared
    distance of a latent to its nearest code (d1), the median gap to the second nearest (d2 − d1),
    β times that gap (over σ with relative or critical β units), the latents' critical β
    (critical_beta: absolute units), and (BA with a running prior) the 10th, 50th and 90th
    percentile of log π over codes and the share of latents whose code the prior moves off the
    nearest one (prior_moves). Where β·(d2 − d1) is small next to the spread of log π, the prior,
    not the distance, picks a latent's code; where prior_moves is near 0 the rate term does nothing."""
    model, cfg, test = saved_run(run_dir, data_dir)
    x = model_input(test, n_images, cfg.pixel_range)
    with torch.no_grad():
        z = vqvae.flatten_latents(model.encode(x)).float()
        nearest = vqvae.squared_distances(z, model.quantizer.codebook).topk(2, dim=1, largest=False).values  # (N, 2)
    out = {"d1": nearest[:, 0].median().item(), "gap": (nearest[:, 1] - nearest[:, 0]).median().item(),
           "critical_beta": critical_beta(z)}
    if cfg.quantizer == "ba_vq":
        sigma = model.quantizer.distance_scale.item() if cfg.beta_units != "absolute" else 1.0
        out["beta_gap"] = model.quantizer.beta * out["gap"] / sigma  # β multiplies d/σ with relative or critical units
        if cfg.ba_prior == "running":
            log_pi = model.quantizer.log_prior()
            out["log_pi_percentiles"] = torch.quantile(log_pi, torch.tensor([0.1, 0.5, 0.9])).tolist()
            with torch.no_grad():
                codes = model.quantizer.hard_codes(z, model.quantizer.distance_unit(z, model.quantizer.codebook), log_pi)
            out["prior_moves"] = (codes != vqvae.nearest_code(z, model.quantizer.codebook)).float().mean().item()
    return out


def last_step_reseeds(run_dir) -> dict:
    """How much of a run's final validation usage (code_counts.json) falls on codes that dead-code
    re-seeding put on a training latent at the very last step. Such a code's EMA count is then
    exactly dead_code_threshold; one that wins nothing in the next batch drops below it and moves
    again, so unused codes hop from latent to latent every step and may be counted as used at
    evaluation without ever having been trained. Returns the number of those codes (reseeded), how
    many of them the validation set used (used), all used codes (used_all), and the share of
    validation latents assigned to them (share)."""
    model = vqvae.load_model(Path(run_dir) / "final_model.pt")
    quantizer = model.quantizer
    if not quantizer.ema or quantizer.dead_code_threshold <= 0:
        raise vqvae.VQVAEError(f"{run_dir}: no dead-code re-seeding (it needs an EMA codebook and dead_code_threshold > 0)")
    fresh = quantizer.cluster_size == quantizer.dead_code_threshold             # (K,) re-seeded at the last step
    counts = read_code_counts(run_dir)
    return {"reseeded": int(fresh.sum()), "used": int(((counts > 0) & fresh).sum()), "used_all": int((counts > 0).sum()),
            "share": (counts[fresh].sum() / counts.sum()).item()}


def train_curve(run_dir) -> dict:
    """The logged training steps of a run: step, batch perplexity, batch usage and (BA) β lists."""
    rows = [r for r in read_history(run_dir) if r["split"] == "train"]
    return {key: [r.get(key) for r in rows] for key in ("step", "perplexity", "usage", "beta")}


def first_crossing(steps: list, values: list, level: float):
    """The first step at which values reach `level` from below (None if they never do)."""
    for step, before, after in zip(steps[1:], values, values[1:]):
        if before is not None and after is not None and before < level <= after:
            return step
    return None


def collapse_ends(steps: list, perplexity: list, level: float = 2.0, hold: int = 5):
    """The first logged step from which the batch perplexity stays above `level` for `hold` logged
    steps in a row: where a run that started on one or two codes per batch has left that state
    (the first step itself if it never was in it; None if it never leaves)."""
    run = 0
    for i, value in enumerate(perplexity):
        run = run + 1 if value is not None and value > level else 0
        if run == hold:
            return steps[i - hold + 1]
    return None


def initial_model(cfg: vqvae.Config) -> vqvae.VQVAE:
    """cfg's model on the CPU, in eval mode, with the weights training starts from (same seed, same
    order of random draws; the codebook before its k-means initialisation)."""
    torch.manual_seed(cfg.seed)
    vqvae.TrainState(cfg, torch.device("cpu"))
    return vqvae.build_model(dataclasses.replace(cfg, compile=False), torch.device("cpu")).eval()


def critical_beta_at_init(cfg: vqvae.Config, images, n_images: int = 512) -> float:
    """critical_beta of the encoder outputs of the first n training images (uint8 numpy, N×32×32×3)
    under cfg's encoder as training initialises it (same seed, same order of random draws), i.e.
    where BA's β stands against the latents' scale at step 0."""
    model = initial_model(cfg)
    x = model_input(images, n_images, cfg.pixel_range)
    with torch.no_grad():
        return critical_beta(vqvae.flatten_latents(model.encode(x)).float())


def soft_spread_at_init(cfg: vqvae.Config, images, betas=(1.0,), n_images: int = 64) -> list[float]:
    """How many codes BA's first E-step spreads a latent over: the median over the latents of the
    first n training images (uint8 numpy, N×32×32×3) of exp(H(p(·|e))), the effective number of
    codes, at each β (in cfg's beta_units; σ is then these latents' batch scale, as at step 0). The
    encoder and the k-means codebook are the ones training starts from (same seeds, same draws);
    the prior is uniform, as the running prior also is at step 0. cfg must be a ba_vq config."""
    if cfg.quantizer != "ba_vq":
        raise vqvae.VQVAEError(f"soft_spread_at_init needs a ba_vq config, got quantizer {cfg.quantizer}")
    if cfg.codebook_init == "kmeans_val":
        raise vqvae.VQVAEError("soft_spread_at_init fits the codebook on training images; codebook_init kmeans_val is not supported")
    model = initial_model(cfg)
    x_train = vqvae.to_device_uint8(images, torch.device("cpu"))
    with torch.no_grad():
        if cfg.codebook_init == "kmeans":
            vqvae.init_codebook_from_data(model, x_train, cfg, torch.Generator().manual_seed(cfg.seed + 1))
        z = vqvae.flatten_latents(model.encode(model_input(images, n_images, cfg.pixel_range))).float()
        quantizer, spread = model.quantizer, []
        quantizer.prior_mode = "uniform"
        for beta in betas:
            quantizer.beta = float(beta)
            p = ba_probabilities(quantizer, z)                                  # (N, K)
            entropy = -(p * p.clamp_min(1e-30).log()).sum(1)                    # (N,) nats
            spread.append(entropy.exp().median().item())
    return spread


def val_curve(records: list, run: str, key: str = "psnr") -> dict:
    """A run's validation metric per epoch over its seeds (records from read_study): epoch (1-based),
    mean and sample std (nan with one seed), over the seeds that reached that epoch, and n, how many did."""
    per_seed = [[r for r in read_history(rec["dir"]) if r["split"] == "val"]
                for rec in records if rec["run"] == run]
    epochs = sorted({v["epoch"] + 1 for rows in per_seed for v in rows})
    out = {"epoch": epochs, "mean": [], "std": [], "n": []}
    for epoch in epochs:
        values = [v[key] for rows in per_seed for v in rows if v["epoch"] + 1 == epoch and v.get(key) is not None]
        mean, std = mean_std(values)
        out["mean"].append(mean), out["std"].append(std), out["n"].append(len(values))
    return out


def gradient_alignment(run_dir, betas=(1.0, 10.0, 100.0), n_images: int = 128, data_dir=None) -> list[dict]:
    """How the encoder's reconstruction gradient through BA's soft path (ba_output hard_soft_grad: the
    code forward, the gradient of Σ_k p(k|e)·c_k backward) compares with the straight-through one, for a
    finished BA run's model at each β of `betas` (its own units), on its first n training images.
    Per β: the cosine between the two gradients w.r.t. z_e, the ratio of their norms, and the share of
    the soft-path gradient's squared norm carried by the 1% of latents with the largest gradient.
    Only the reconstruction loss; every β and output starts from the saved model."""
    model, cfg, train = saved_run(run_dir, data_dir, split="train")
    x = model_input(train, n_images, cfg.pixel_range)
    rows = []
    for beta in betas:
        grads = {}
        for output in ("hard_soft_grad", "hard_ste"):
            m = copy.deepcopy(model).train()  # a training forward moves EMA statistics, σ and the prior
            m.quantizer.output, m.quantizer.beta = output, float(beta)
            z_e = m.encode(x).detach().requires_grad_(True)
            z_q, _, _ = m.quantizer(z_e)
            torch.nn.functional.mse_loss(m.decoder(z_q), x).backward()
            grads[output] = vqvae.flatten_latents(z_e.grad).cpu()               # (N, D)
        with vqvae.host_math():
            soft, ste = grads["hard_soft_grad"].double(), grads["hard_ste"].double()
            per_latent = soft.pow(2).sum(1).sort(descending=True).values
            rows.append({"beta": float(beta),
                         "cosine": torch.nn.functional.cosine_similarity(soft.flatten(), ste.flatten(), dim=0).item(),
                         "norm_ratio": (soft.norm() / ste.norm()).item(),
                         "top1pct_share": (per_latent[: max(1, len(per_latent) // 100)].sum() / per_latent.sum()).item()})
    return rows


# ---------------------------------------------------------------------------------------------
# Figures of the committed studies (RESULTS.md, README.md)
# ---------------------------------------------------------------------------------------------

# The three runs the "Can BA beat VQ-EMA?" figures compare, at K = 512 (these names) and
# K = 16,384 (the same names ending in _k16384), in results/ba_wins.
WINS_RUNS = {"baseline": "VQ-EMA", "baseline_dead_reset": "VQ-EMA, re-seeded", "rel_ste_ema_rate_reset": "BA finalist"}
K_SUFFIX = re.compile(r"_k\d+$")
WINS_COLORS = {"baseline": "tab:blue", "baseline_dead_reset": "tab:green", "rel_ste_ema_rate_reset": "tab:orange"}
# The published runs that were one configuration in the published code (their BA loss terms never
# reached a gradient), so the re-run of ba_default stands for all four.
PUBLISHED_SAME_AS = {"ba_high_entropy": "ba_default", "ba_low_entropy": "ba_default", "ba_high_commitment": "ba_default"}
# The critical β of the encoder outputs at step 0 (study.critical_beta_at_init, 512 training images,
# seeds 1337 / 1338 / 1339), measured on the CIFAR-10 copy and written down here because the
# figure command runs without the data: below it BA's only fixed point is one code for every latent.
CRITICAL_BETA_AT_INIT = {"published recipe": (177, 293, 228), "our recipe": (21, 24, 12)}
# The 600-step collapse sweep: each run is the published ba_iters5 with one change.
COLLAPSE_RUNS = {"published": "published recipe", "prior_uniform": "uniform prior", "grad_last_step_only":
                 "gradient through last E-step only", "codebook_grad": "codebook by gradient only",
                 "model_small_signed": "our model, [−1, 1] pixels", "all_ours": "all of our recipe"}


def study_runs(results_dir: Path, study_name: str, runs) -> list[dict]:
    """read_study of results_dir/study_name, refusing (VQVAEError) when the study or one of `runs`
    has no finished run there."""
    study_dir = Path(results_dir) / study_name
    if not study_dir.is_dir():
        raise vqvae.VQVAEError(f"make_figures needs the study {study_dir} (not found)")
    records = [r for r in read_study(study_dir) if r["final"] is not None]
    missing = [run for run in runs if not any(r["run"] == run for r in records)]
    if missing:
        raise vqvae.VQVAEError(f"make_figures needs the finished runs {', '.join(missing)} in {study_dir}")
    return records


def seed_values(records: list, run: str, key: str) -> list[float]:
    """A final metric of each finished seed of `run`, in seed order."""
    return [r["final"][key] for r in records if r["run"] == run and r["final"] is not None]


def by_seed(records: list, run: str) -> dict:
    """run's finished records keyed by seed."""
    return {r["seed"]: r for r in records if r["run"] == run and r["final"] is not None}


def fill_band(ax, x, mean, std, color, label):
    """A mean line with a ± std band (no band where std is nan: one seed)."""
    ax.plot(x, mean, "o-", ms=3, color=color, label=label)
    std = [s if s == s else 0.0 for s in std]
    ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=color,
                    alpha=0.2, lw=0)


def figure_usage_psnr_vs_k(plt, records: list):
    """PSNR, code usage and perplexity against K for the three compared runs: seeds as dots, mean line."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for i, (run, label) in enumerate(WINS_RUNS.items()):
        shift = 1.12 ** (i - 1)                         # side by side, so equal results stay visible
        ks, per_key = [512 * shift, 16384 * shift], {"psnr": [], "usage_rate": [], "perplexity": []}
        for name in (run, f"{run}_k16384"):
            for key in per_key:
                per_key[key].append(seed_values(records, name, key))
        for ax, (key, values) in zip(axes, per_key.items()):
            scale = 100 if key == "usage_rate" else 1
            means = [sum(v) / len(v) * scale for v in values]
            ax.plot(ks, means, "-", color=WINS_COLORS[run], label=label, lw=1.2)
            for k, seeds in zip(ks, values):
                ax.plot([k] * len(seeds), [s * scale for s in seeds], "os^"[i], ms=4, color=WINS_COLORS[run],
                        alpha=0.7)
    axes[2].plot([512, 16384], [512, 16384], "k:", lw=0.8, label="perplexity = K (every code equally used)")
    labels = ["validation PSNR (dB, whole set, [0,1] pixels)", "codes used (% of K, whole set)",
              "perplexity (whole set)"]
    for ax, label in zip(axes, labels):
        ax.set_xscale("log", base=2)
        ax.set_xticks([512, 16384], ["512", "16,384"])
        ax.set_xlabel("codebook size K")
        ax.set_ylabel(label)
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    axes[2].legend(fontsize=7, loc="upper left")
    fig.suptitle("Small model, 10 epochs, CIFAR-10; dots: seeds 1337–1339, line: their mean", fontsize=10)
    fig.tight_layout()
    return fig


def figure_val_psnr(plt, records: list):
    """Validation PSNR per epoch, mean ± std over seeds, at K = 512 and K = 16,384 (one panel each)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, (suffix, title) in zip(axes, [("", "K = 512"), ("_k16384", "K = 16,384")]):
        for run, label in WINS_RUNS.items():
            curve = val_curve(records, run + suffix, "psnr")
            fill_band(ax, curve["epoch"], curve["mean"], curve["std"], WINS_COLORS[run],
                      f"{label} ({max(curve['n'], default=0)} seeds)")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation PSNR (dB, whole set)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def figure_matched_baselines(plt, records: list):
    """Each BA run of a study against each VQ-EMA run of the same K, seed by seed: the difference in
    PSNR and in perplexity (dots: seeds both runs have; bar: their mean). Above 0: BA ahead."""
    finished = [r for r in records if r["final"] is not None]
    k_of = {r["run"]: r["config"].get("codebook_size") for r in finished}
    quantizer_of = {r["run"]: r["config"].get("quantizer") for r in finished}
    ba_runs = [run for run in k_of if quantizer_of[run] == "ba_vq"]
    kinds = list(dict.fromkeys(K_SUFFIX.sub("", run) for run in k_of if quantizer_of[run] == "vq_ema"))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    width = 0.8 / max(len(kinds), 1)
    for i, run in enumerate(ba_runs):
        ba_seeds = by_seed(finished, run)
        bases = [b for b in k_of if quantizer_of[b] == "vq_ema" and k_of[b] == k_of[run]]
        for base in bases:
            j = kinds.index(K_SUFFIX.sub("", base))
            base_seeds = by_seed(finished, base)
            seeds = sorted(set(base_seeds) & set(ba_seeds))
            x = i + (j - (len(kinds) - 1) / 2) * width
            for ax, key in zip(axes, ("psnr", "perplexity")):
                diffs = [ba_seeds[s]["final"][key] - base_seeds[s]["final"][key] for s in seeds]
                if diffs:
                    ax.bar(x, sum(diffs) / len(diffs), width, color=f"C{j}", alpha=0.35)
                    ax.plot([x] * len(diffs), diffs, "o", ms=4, color=f"C{j}")
    for j, kind in enumerate(kinds):
        axes[0].bar(0, 0, 0, color=f"C{j}", alpha=0.35, label=f"against {kind} (same K)")
    for ax, label in zip(axes, ["PSNR difference (dB, whole set)", "perplexity difference (whole set)"]):
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(ba_runs)), [f"{run} (K = {k_of[run]:,})" for run in ba_runs], rotation=20,
                      ha="right", fontsize=8)
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    axes[1].set_yscale("symlog", linthresh=10)
    fig.suptitle("BA run − VQ-EMA run of the same K and seed (dots: seeds, bar: mean); above 0: BA ahead",
                 fontsize=10)
    fig.tight_layout()
    return fig


def figure_published_rerun(plt, records: list):
    """The published recipe re-run, seed by seed, beside the published single-run numbers (batch level)."""
    runs = [run for run in PUBLISHED if run not in PUBLISHED_SAME_AS and by_seed(records, run)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    for ax, (key, i, label) in zip(axes, [("psnr_batch", 0, "PSNR (dB), per-batch mean"),
                                          ("perplexity_batch", 1, "perplexity, per-batch mean")]):
        for x, run in enumerate(runs):
            values = seed_values(records, run, key)
            ax.plot([x] * len(values), values, "o", ms=5, color="tab:blue", alpha=0.7,
                    label="re-run here, one dot per seed" if x == 0 else None)
            published = [PUBLISHED[run][i]] + [PUBLISHED[p][i] for p, same in PUBLISHED_SAME_AS.items() if same == run]
            ax.plot([x] * len(published), published, "kx", ms=8, mew=2,
                    label="published (one run each; runs of one configuration share a column)" if x == 0 else None)
        ax.set_xticks(range(len(runs)), runs, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.legend(fontsize=7, loc="lower left")
    axes[1].set_yscale("log")
    fig.suptitle("Published recipe re-run (sonnet model, [0,1] pixels, crop + flip): the published study's "
                 "convention, validation batches of 128", fontsize=10)
    fig.tight_layout()
    return fig


def figure_ba_collapse(plt, published: list, ours: list, collapse: list, collapse_200: list):
    """Left: batch perplexity per step of ba_iters5 under the published recipe and ours. Middle: β
    against the latents' critical β at step 0. Right: the 600-step collapse sweep (β held at 0.5),
    one change from the published ba_iters5 per run; thin lines: the 200-step version's other seeds."""
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    ax = axes[0]
    for recs, color, label in [(published, "tab:red", "published recipe"), (ours, "tab:blue", "our recipe")]:
        for i, rec in enumerate(r for r in recs if r["run"] == "ba_iters5"):
            curve = train_curve(rec["dir"])
            ax.semilogy(curve["step"], curve["perplexity"], color=color, lw=0.8, alpha=0.8,
                        label=f"ba_iters5, {label} (one line per seed)" if i == 0 else None)
    ax.set_title("ba_iters5 over 10 epochs", fontsize=10)
    ax.set_ylabel("batch perplexity (training batch)")
    ax = axes[1]
    curve = train_curve(next(r for r in published if r["run"] == "ba_iters5")["dir"])
    ax.semilogy(curve["step"], curve["beta"], "k-", lw=1.5, label="β (both recipes: 0.5 → 3)")
    for (label, values), color in zip(CRITICAL_BETA_AT_INIT.items(), ["tab:red", "tab:blue"]):
        for j, value in enumerate(values):
            ax.axhline(value, color=color, ls=":", lw=1.2, label=f"critical β at step 0, {label} (seeds)" if j == 0 else None)
    ax.set_title("β against the critical β, below which BA has one fixed point", fontsize=10)
    ax.set_ylabel("β")
    ax = axes[2]
    for i, (run, label) in enumerate(COLLAPSE_RUNS.items()):
        for rec in (r for r in collapse if r["run"] == run):
            curve = train_curve(rec["dir"])
            ax.semilogy(curve["step"], curve["perplexity"], color=f"C{i}", lw=1.2, label=label)
        for rec in (r for r in collapse_200 if r["run"] == run and r["seed"] != 1337):
            curve = train_curve(rec["dir"])
            ax.semilogy(curve["step"], curve["perplexity"], color=f"C{i}", lw=0.6, alpha=0.5)
    ax.set_title("published ba_iters5 with one change, β held at 0.5", fontsize=10)
    ax.set_ylabel("batch perplexity (training batch)")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def figure_sorted_usage(plt, records: list):
    """The final validation histogram of each compared run (first seed), codes sorted by use; rank and
    count normalised by K so that K = 512 and K = 16,384 share the axes."""
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for run, label in WINS_RUNS.items():
        for suffix, style in [("", "-"), ("_k16384", "--")]:
            rec = min(by_seed(records, run + suffix).values(), key=lambda r: r["seed"])
            counts = read_code_counts(rec["dir"]).sort(descending=True).values.double()
            k = len(counts)
            share = (counts * k / counts.sum()).clamp_min(1e-3)            # 1 = the mean use of a code
            ax.semilogy((torch.arange(k) + 1) / k, share.numpy(), style, color=WINS_COLORS[run], lw=1.2,
                        label=f"{label}, K = {k:,}")
    ax.axhline(1, color="k", lw=0.6, ls=":")
    ax.set_xlabel("code rank / K (codes sorted from most to least used)")
    ax.set_ylabel("use of the code ÷ mean use (unused drawn at 1e-3)")
    ax.legend(fontsize=8)
    ax.set_title("Sorted code usage, whole validation set (seed 1337)", fontsize=10)
    fig.tight_layout()
    return fig


def figure_recon_grid(plt, records: list):
    """The compared runs' recon.png side by side (seed 1337: the first eight validation images, all
    airplanes, above their reconstructions): one row per run, K = 512 left, K = 16,384 right."""
    from PIL import Image

    fig, axes = plt.subplots(len(WINS_RUNS), 2, figsize=(13, 1.9 * len(WINS_RUNS)), squeeze=False)
    for row, (run, label) in zip(axes, WINS_RUNS.items()):
        for ax, (suffix, k) in zip(row, [("", "512"), ("_k16384", "16,384")]):
            path = min(by_seed(records, run + suffix).values(), key=lambda r: r["seed"])["dir"] / "recon.png"
            if not path.is_file():
                raise vqvae.VQVAEError(f"make_figures needs {path}")
            ax.imshow(Image.open(path).convert("RGB"), interpolation="nearest")
            ax.set_title(f"{label}, K = {k}", fontsize=9, loc="left")
            ax.axis("off")
    fig.suptitle("Top row of each: validation originals; bottom: reconstructions from the hard codes", fontsize=10)
    fig.tight_layout()
    return fig


def make_figures(results_dir="results", out_dir="results/figures") -> list[Path]:
    """Draw the figures of RESULTS.md and README.md from the committed studies under results_dir and
    save them as PNG files in out_dir; returns their paths. Needs the studies ba_wins,
    ba_study_published, ba_study, ba_collapse and ba_collapse_200 (a VQVAEError names the one
    missing). Reads files only: no data set, no model.

        python -c "import study; study.make_figures()"
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results_dir, out_dir = Path(results_dir), Path(out_dir)
    compared = [run + suffix for run in WINS_RUNS for suffix in ("", "_k16384")]
    wins = study_runs(results_dir, "ba_wins", compared)
    published = study_runs(results_dir, "ba_study_published", ["baseline", "ba_default", "ba_iters1", "ba_iters5"])
    ours = study_runs(results_dir, "ba_study", ["ba_iters5"])
    collapse = study_runs(results_dir, "ba_collapse", list(COLLAPSE_RUNS))
    collapse_200 = study_runs(results_dir, "ba_collapse_200", ["published"])
    figures = {"usage_psnr_vs_k": lambda: figure_usage_psnr_vs_k(plt, wins),
               "val_psnr_per_epoch": lambda: figure_val_psnr(plt, wins),
               "ba_vs_matched_baseline": lambda: figure_matched_baselines(plt, wins),
               "published_rerun": lambda: figure_published_rerun(plt, published),
               "ba_collapse": lambda: figure_ba_collapse(plt, published, ours, collapse, collapse_200),
               "sorted_usage": lambda: figure_sorted_usage(plt, wins),
               "recon_grid": lambda: figure_recon_grid(plt, wins)}
    rd_dir = results_dir / "rate_distortion"
    if rd_dir.is_dir():  # drawn once the rate–distortion study has results
        figures["rate_distortion"] = lambda: figure_rate_distortion(
            plt, rd_points(read_study(rd_dir)), "Small model, CIFAR-10; markers: runs (bars: std over seeds)")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, draw in figures.items():
        fig = draw()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# Rate and distortion: PSNR against bits per pixel, one point per run of a study
# ---------------------------------------------------------------------------------------------


def rd_family(config: dict) -> str:
    """The frontier a run belongs to: its quantizer, and ", re-seeded" with dead-code re-seeding."""
    return config["quantizer"] + (", re-seeded" if config.get("dead_code_threshold", 0) > 0 else "")


def rd_points(records: list) -> list[dict]:
    """One point per finished run of a study (records from read_study) that has the rate metrics: its
    family, name, number of seeds, and mean and sample std over seeds of bits_per_pixel, bits_per_index
    and psnr (dataset level, [0, 1] pixels); the seeds' own values in `per_seed`."""
    points = []
    for run in dict.fromkeys(r["run"] for r in records):
        done = [r for r in records if r["run"] == run and r["final"] and "bits_per_pixel" in r["final"]]
        if not done:
            continue
        point = {"family": rd_family(done[0]["config"]), "run": run, "seeds": len(done),
                 "per_seed": {r["seed"]: r["final"] for r in done}}
        for key in ("bits_per_pixel", "bits_per_index", "psnr"):
            point[key], point[f"{key}_std"] = mean_std([r["final"][key] for r in done])
        points.append(point)
    return points


def family_line(points: list, family: str, seed=None) -> list[tuple]:
    """A family's points as (bits_per_pixel, psnr, run), sorted by rate: the means over seeds, or with
    `seed` the values of that seed (runs without it left out)."""
    if seed is None:
        return sorted((p["bits_per_pixel"], p["psnr"], p["run"]) for p in points if p["family"] == family)
    return sorted((p["per_seed"][seed]["bits_per_pixel"], p["per_seed"][seed]["psnr"], p["run"])
                  for p in points if p["family"] == family and seed in p["per_seed"])


def envelope(line: list) -> list[tuple]:
    """The points of a line (rate, psnr, run) that no point of lower or equal rate beats: the family's
    operational rate–distortion frontier, sorted by rate."""
    kept = []
    for point in sorted(line):
        if kept and point[1] > kept[-1][1] and point[0] == kept[-1][0]:
            kept[-1] = point
        elif not kept or point[1] > kept[-1][1]:
            kept.append(point)
    return kept


def frontier_at(line: list, bits_per_pixel: float):
    """(psnr, lower run, upper run): the envelope of a line (rate, psnr, run) at a rate, linear between
    its two neighbouring points; None outside the measured range."""
    front = envelope(line)
    for (r0, q0, n0), (r1, q1, n1) in zip(front, front[1:]):
        if r0 <= bits_per_pixel <= r1:
            return q0 + (q1 - q0) * (bits_per_pixel - r0) / (r1 - r0), n0, n1
    if front and front[-1][0] == bits_per_pixel:
        return front[-1][1], front[-1][2], front[-1][2]
    return None


def frontier_psnr(points: list, family: str, bits_per_pixel: float):
    """A family's frontier PSNR (means over seeds) at a rate, or None outside its measured range."""
    found = frontier_at(family_line(points, family), bits_per_pixel)
    return None if found is None else found[0]


def matched_rate(points: list, family: str, against: str) -> list[dict]:
    """Each run of `family` against the frontier of `against` at the run's own rate, seed by seed: the
    difference psnr − frontier for every seed the run has, where `against`'s frontier of the same seed
    covers that rate. One row per run with at least one such seed: the seeds' differences, their mean,
    sample std and minimum, and the runs the frontier was interpolated between in any seed (by rate)."""
    rows, rate = [], {q["run"]: q["bits_per_pixel"] for q in points if q["family"] == against}
    for p in (q for q in points if q["family"] == family):
        diffs, neighbours, fronts = {}, {}, []
        for seed, final in sorted(p["per_seed"].items()):
            found = frontier_at(family_line(points, against, seed), final["bits_per_pixel"])
            if found is not None:
                diffs[seed] = final["psnr"] - found[0]
                fronts.append(found[0])
                neighbours.update(dict.fromkeys(found[1:]))  # in order of rate
        if diffs:
            mean, std = mean_std(list(diffs.values()))
            rows.append({"run": p["run"], "family": family, "against": against, "bits_per_pixel": p["bits_per_pixel"],
                         "psnr": p["psnr"], "frontier": sum(fronts) / len(fronts),
                         "neighbours": sorted(neighbours, key=rate.get),
                         "diffs": diffs, "diff": mean, "diff_std": std, "diff_min": min(diffs.values())})
    return rows


def saturation(points: list, family: str, within: float = 0.1) -> dict:
    """Where a family stops gaining: its best run (mean PSNR) and the lowest-rate run whose PSNR is
    within `within` dB of it; `rising` when the best run is also the family's highest-rate one, i.e.
    PSNR still grew at the largest size measured."""
    line = family_line(points, family)
    best = max(line, key=lambda q: q[1])
    first = next(q for q in line if q[1] >= best[1] - within)
    return {"family": family, "best": best[2], "best_psnr": best[1], "best_rate": best[0], "saturates": first[2],
            "saturation_rate": first[0], "rising": len(line) > 1 and best is line[-1] and first is best}


def rd_markdown(points: list) -> str:
    """The matched-rate comparisons and the saturation of each family, as markdown (empty with one family)."""
    families = list(dict.fromkeys(p["family"] for p in points))
    if len(families) < 2:
        return ""
    lines = ["", "## Rate and distortion", "",
             "Each run against another family's frontier at the run's own rate (bits/pixel), seed by seed: the "
             "frontier is the upper envelope of that family's runs of the same seed, interpolated linearly "
             "between its two neighbouring runs (named; seeds may fall between different pairs). Δ = psnr − "
             "frontier, dataset-level PSNR in [0,1] pixels; mean ± sample std and the smallest Δ over the seeds "
             "compared.", "",
             "| run | against | seeds | bits/pixel | psnr (dB) | frontier (dB) | between | Δ per seed (dB) | Δ (dB) "
             "| min Δ (dB) |", "|---" * 10 + "|"]
    compared = [f for f in families if not f.startswith("vq_ema")]
    for family in compared:
        for against in (f for f in families if f != family and (f.startswith("vq_ema") or f == "fsq")):
            for r in matched_rate(points, family, against):
                per_seed = ", ".join(f"{d:+.2f}" for d in r["diffs"].values())
                spread = "" if math.isnan(r["diff_std"]) else f" ± {r['diff_std']:.2f}"
                lines.append(f"| {r['run']} | {against} | {len(r['diffs'])} | {r['bits_per_pixel']:.3f} | "
                             f"{r['psnr']:.2f} | {r['frontier']:.2f} | {', '.join(r['neighbours'])} | {per_seed} "
                             f"| {r['diff']:+.2f}{spread} | {r['diff_min']:+.2f} |")
    lines += ["", "Saturation: each family's best run (mean PSNR) and the lowest-rate run within 0.1 dB of it.", "",
              "| family | best run | its bits/pixel | its psnr (dB) | within 0.1 dB from | at bits/pixel |",
              "|---" * 6 + "|"]
    for family in families:
        s = saturation(points, family)
        lines.append(f"| {family} | {s['best']} | {s['best_rate']:.3f} | {s['best_psnr']:.2f} | "
                     f"{'still rising at the highest rate measured' if s['rising'] else s['saturates']} | "
                     f"{'—' if s['rising'] else format(s['saturation_rate'], '.3f')} |")
    return "\n".join(lines) + "\n"


def figure_rate_distortion(plt, points: list, title: str = ""):
    """PSNR against bits per pixel: one marker per run (bars: std over seeds), a line per family along its
    frontier (the runs no lower-rate run of the family beats)."""
    fig, ax = plt.subplots(figsize=(7.5, 5))
    colors = {"vq_ema": "tab:blue", "vq_ema, re-seeded": "tab:green", "ba_vq": "tab:orange",
              "ba_vq, re-seeded": "tab:red", "fsq": "tab:purple"}
    for family, color in colors.items():
        mine = [p for p in points if p["family"] == family]
        if not mine:
            continue
        x, y = [p["bits_per_pixel"] for p in mine], [p["psnr"] for p in mine]
        xerr = [0 if p["bits_per_pixel_std"] != p["bits_per_pixel_std"] else p["bits_per_pixel_std"] for p in mine]
        yerr = [0 if p["psnr_std"] != p["psnr_std"] else p["psnr_std"] for p in mine]
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o", ms=4, color=color, capsize=2, label=family)
        for p in mine if family.startswith("ba_vq") else []:  # BA's points crowd at one rate: name them
            ax.annotate(p["run"], (p["bits_per_pixel"], p["psnr"]), xytext=(-14, 0), textcoords="offset points",
                        ha="right", va="center", fontsize=7, color=color)
        front = envelope(family_line(points, family))
        ax.plot([q[0] for q in front], [q[1] for q in front], "-", color=color, lw=1.2)
    ax.set_xlabel("rate: bits per pixel (validation codes under the training marginal)")
    ax.set_ylabel("validation PSNR (dB, whole set, [0, 1] pixels)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
