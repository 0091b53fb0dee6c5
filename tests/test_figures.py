"""study.make_figures draws the figures of RESULTS.md from study directories: here, a tiny hand-made
one with the runs the figures name (a few logged steps, two epochs, a small codebook)."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

import study
import vqvae

pytest.importorskip("matplotlib")

STUDIES = {  # study: (run, quantizer, K)
    "ba_wins": [(run + suffix, quantizer, k) for suffix, k in [("", 8), ("_k16384", 32)]
                for run, quantizer in [("baseline", "vq_ema"), ("baseline_dead_reset", "vq_ema"),
                                       ("rel_ste_ema_rate_reset", "ba_vq")]],
    "ba_study_published": [("baseline", "vq_ema", 8), ("ba_default", "ba_vq", 8), ("ba_iters1", "ba_vq", 8),
                           ("ba_iters5", "ba_vq", 8)],
    "ba_study": [("ba_iters5", "ba_vq", 8)],
    "ba_collapse": [(run, "ba_vq", 8) for run in study.COLLAPSE_RUNS],
    "ba_collapse_200": [("published", "ba_vq", 8)],
    "rate_distortion": [("vq_k8", "vq_ema", 8), ("vq_k32", "vq_ema", 32), ("ba_b30", "ba_vq", 32), ("ba_b100", "ba_vq", 32)],
}


def fake_run(run_dir, quantizer: str, k: int, seed: int, rng) -> None:
    """The files a finished run leaves, with made-up numbers."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"quantizer: {quantizer}\ncodebook_size: {k}\nseed: {seed}\n")
    beta = {"beta": 0.5} if quantizer == "ba_vq" else {}
    rows = [{"split": "train", "step": step, "epoch": step // 20, "perplexity": float(1 + step * rng.random()), **beta}
            for step in range(10, 41, 10)]
    rows += [{"split": "val", "step": 20 * (e + 1), "epoch": e, "psnr": 20 + e + rng.random()} for e in range(2)]
    (run_dir / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    final = {"psnr": 21 + rng.random(), "perplexity": k * rng.random(), "usage_rate": rng.random(),
             "psnr_batch": 21 + rng.random(), "perplexity_batch": k * rng.random(), "usage_batch": rng.random(),
             "bits_per_index": np.log2(k) * rng.random(), "bits_per_pixel": np.log2(k) * rng.random() / 16}
    (run_dir / "final_metrics.json").write_text(json.dumps(final))
    (run_dir / "code_counts.json").write_text(json.dumps({"split": "val", "counts": rng.integers(0, 9, k).tolist()}))
    Image.fromarray(rng.integers(0, 255, (70, 274, 3), dtype=np.uint8)).save(run_dir / "recon.png")


@pytest.fixture
def results(tmp_path):
    rng = np.random.default_rng(0)
    for name, runs in STUDIES.items():
        for run, quantizer, k in runs:
            for seed in (1337, 1338):
                fake_run(tmp_path / "results" / name / (run if seed == 1337 else f"{run}_seed{seed}"),
                         quantizer, k, seed, rng)
    return tmp_path / "results"


@pytest.mark.slow
def test_make_figures_writes_every_figure(results, tmp_path):
    paths = study.make_figures(results, tmp_path / "figures")
    assert len(paths) == 8 and paths[-1].name == "rate_distortion.png"
    for path in paths:
        assert path.suffix == ".png" and path.stat().st_size > 1000
        assert Image.open(path).size[0] > 300


def test_a_missing_study_or_run_is_named(results, tmp_path):
    shutil.rmtree(results / "ba_collapse")
    with pytest.raises(vqvae.VQVAEError, match="ba_collapse"):
        study.make_figures(results, tmp_path / "figures")
    shutil.rmtree(results / "ba_wins" / "baseline_dead_reset_k16384")
    shutil.rmtree(results / "ba_wins" / "baseline_dead_reset_k16384_seed1338")
    with pytest.raises(vqvae.VQVAEError, match="baseline_dead_reset_k16384"):
        study.make_figures(results, tmp_path / "figures")
    assert not (tmp_path / "figures").exists()
