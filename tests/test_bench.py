"""bench/bench.py: the ratios it reports, and a tiny end-to-end run on generated data."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import vqvae

pytestmark = pytest.mark.slow  # processes, whole runs or W&B: the full suite only (pytest -m "not slow" skips)

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench", ROOT / "bench" / "bench.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def row(impl, quantizer, images_per_s, peak, precision="fp32", K=512):
    return {"arch": "small", "quantizer": quantizer, "ba_iters": 1, "K": K, "impl": impl, "precision": precision,
            "train_images_per_s": images_per_s, "peak_rss_gib": peak}


def test_ratios_are_taken_pair_by_pair():
    rows = [row("ours", "vq_ema", 300.0, 1.0), row("seed_ref", "vq_ema", 100.0, 4.0), row("library", "vq_ema", 50.0, 2.0),
            row("ours", "ba_vq", 200.0, 1.5), row("seed_ref", "ba_vq", 40.0, 3.0),
            row("ours", "vq_ema", 900.0, 1.0, K=2048),  # no partner at K=2048: no ratio
            {**row("seed_ref", "ba_vq", 0, 0, K=2048), "skipped": "predicted > 20 GiB"}]
    ratios = {r["what"]: r["ratio"] for r in bench.compute_ratios(rows)}
    assert ratios == pytest.approx({
        "small vq_ema iters=1 K=512 fp32 speed ours/seed_ref": 3.0,
        "small vq_ema iters=1 K=512 fp32 memory ours/seed_ref": 0.25,
        "small vq_ema iters=1 K=512 fp32 speed ours/library": 6.0,
        "small ba_vq iters=1 K=512 fp32 speed ours/seed_ref": 5.0,
        "small ba_vq iters=1 K=512 fp32 memory ours/seed_ref": 0.5,
        "small ba_vq iters=1 K=512 fp32 step time ba_vq/vq_ema": 1.5,
    })


def test_rounds_combine_to_the_median_speed_and_the_largest_memory():
    rounds = [{"train_images_per_s": s, "peak_rss_gib": m} for s, m in ((10.0, 1.0), (30.0, 3.0), (20.0, 2.0))]
    combined = bench.combine(rounds)
    assert combined["train_images_per_s"] == 20.0 and combined["peak_rss_gib"] == 3.0
    assert bench.combine([{"skipped": "failed: x"}]) == {"skipped": "failed: x"}


def test_a_tiny_benchmark_runs_end_to_end(tmp_path):
    data = tmp_path / "data.npz"  # seed_ref times 35 batches at this K: 35 · 4 ≤ 256 images
    np.savez(data, x_train=vqvae.make_synthetic(256, seed=0), x_test=vqvae.make_synthetic(64, seed=1))
    out = tmp_path / "results.json"
    seed_ref = ROOT.parent / "shared" / "bench" / "seed_ref.py"  # the team's reference trainer, where present
    with_seed_ref = seed_ref.is_file()
    cmd = [sys.executable, str(ROOT / "bench" / "bench.py"), "--data", str(data), "--arch", "small",
           "--K", "64", "--precision", "fp32", "--ba_iters", "1", "--batch", "4", "--steps", "2", "--warmup", "1",
           "--eval_K", "64", "--no_library", "--out", str(out)] + (["--seed_ref", str(seed_ref)] if with_seed_ref else [])
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    result = json.loads(out.read_text())
    ours = [r for r in result["rows"] if r["impl"] == "ours"]
    assert [r["quantizer"] for r in ours] == ["vq_ema", "ba_vq"]
    assert all(r["train_images_per_s"] > 0 and r["peak_rss_gib"] > 0 and r["eval_over_epoch"] > 0 for r in ours)
    whats = [r["what"] for r in result["ratios"]]
    assert "small ba_vq iters=1 K=64 fp32 step time ba_vq/vq_ema" in whats
    if with_seed_ref:
        assert "small vq_ema iters=1 K=64 fp32 speed ours/seed_ref" in whats
    assert "| small | vq_ema | 1 | 64 | ours | fp32 |" in bench.markdown_report(result)


def test_settings_reach_the_quantizers_they_apply_to_and_beta_makes_a_row_each(tmp_path):
    assert bench.parse_settings(["dead_code_threshold=0.03", "ba_prior=running", "ba_fast_path=false"]) == {
        "dead_code_threshold": 0.03, "ba_prior": "running", "ba_fast_path": False}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        bench.parse_settings(["ba_prior"])
    data = tmp_path / "data.npz"
    np.savez(data, x_train=vqvae.make_synthetic(256, seed=0), x_test=vqvae.make_synthetic(64, seed=1))
    out = tmp_path / "results.json"
    cmd = [sys.executable, str(ROOT / "bench" / "bench.py"), "--data", str(data), "--arch", "small", "--K", "64",
           "--precision", "fp32", "--ba_iters", "1", "--batch", "4", "--steps", "2", "--warmup", "1", "--eval_K", "0",
           "--no_library", "--out", str(out), "--beta", "1", "100", "--set", "beta_units=relative",
           "ba_prior=running", "ba_codebook_update=ema", "entropy_weight=0", "dead_code_threshold=0.5"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)  # vq_ema takes only the threshold
    result = json.loads(out.read_text())
    assert [(r["quantizer"], r.get("beta")) for r in result["rows"]] == [("vq_ema", None), ("ba_vq", 1.0), ("ba_vq", 100.0)]
    whats = {r["what"] for r in result["ratios"]}
    assert {"small ba_vq iters=1 K=64 fp32 β=1 step time ba_vq/vq_ema",
            "small ba_vq iters=1 K=64 fp32 β=100 step time ba_vq/vq_ema"} <= whats
    assert "| small | ba_vq | 1 | 64 | ours β=100 | fp32 |" in bench.markdown_report(result)


def test_start_from_continues_trained_models_with_their_settings_and_state(tmp_path):
    """Late-training step times: each row continues a run's final_model.pt (or its last.pt, optimizer state
    and all) with that run's settings, and BA's β stays at the value its schedule ended on (not
    beta_start); the pair gives the BA/VQ ratio."""
    from conftest import tiny_config

    models = []
    for name, quantizer, extra in (("vq", "vq_ema", {}), ("ba", "ba_vq", dict(beta_start=1.0, beta_end=7.0, ba_prior="running"))):
        cfg = tiny_config(tmp_path, quantizer=quantizer, name=name, codebook_size=64, max_steps=3, **extra)
        vqvae.train(cfg)
        models.append(str(vqvae.run_dir_of(cfg) / ("final_model.pt" if name == "vq" else "last.pt")))
    data = tmp_path / "data.npz"
    np.savez(data, x_train=vqvae.make_synthetic(256, seed=0), x_test=vqvae.make_synthetic(64, seed=1))
    out = tmp_path / "results.json"
    cmd = [sys.executable, str(ROOT / "bench" / "bench.py"), "--data", str(data), "--start_from", *models,
           "--batch", "4", "--steps", "2", "--warmup", "1", "--eval_K", "0", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    result = json.loads(out.read_text())
    assert [(r["quantizer"], r["K"], r["from"]) for r in result["rows"]] == [("vq_ema", 64, "vq"), ("ba_vq", 64, "ba")]
    assert result["rows"][1]["quantizer_state"] == {"beta": 7.0}
    assert [r["continues_optimizer"] for r in result["rows"]] == [False, True]
    whats = {r["what"] for r in result["ratios"]}
    assert "small ba_vq iters=1 K=64 fp32 from ba step time ba_vq/vq_ema" in whats


wp_spec = importlib.util.spec_from_file_location("whole_process", ROOT / "bench" / "whole_process.py")
whole_process = importlib.util.module_from_spec(wp_spec)
wp_spec.loader.exec_module(whole_process)


def test_whole_process_ratios_are_taken_round_by_round():
    rounds = [{"round": 0, "case": "c", "impl": "ours", "wall_s": 10.0, "seconds": {"steps": 8.0}},
              {"round": 0, "case": "c", "impl": "seed_ref", "wall_s": 60.0},
              {"round": 1, "case": "c", "impl": "ours", "wall_s": 20.0, "seconds": {"steps": 16.0}},
              {"round": 1, "case": "c", "impl": "seed_ref", "wall_s": 80.0},
              {"round": 2, "case": "c", "impl": "ours", "failed": "over the limit"}]
    (row,) = whole_process.summarize(rounds)
    assert row["ratios"] == [6.0, 4.0] and row["ratio"] == 5.0
    assert row["ours_wall_s"] == 15.0 and row["seed_ref_wall_s"] == 70.0 and row["ours_seconds"] == {"steps": 12.0}
    assert "| c | 70.0 | 15.0 | 5.00 (6.00, 4.00) | 12.0 |" in whole_process.markdown([row])


def test_per_step_seconds_are_the_difference_of_two_lengths():
    rounds = [{"round": 0, "case": "c", "impl": "ours", "steps": 30, "wall_s": 40.0},
              {"round": 0, "case": "c", "impl": "ours", "steps": 230, "wall_s": 60.0},
              {"round": 0, "case": "c", "impl": "seed_ref", "steps": 30, "wall_s": 50.0},
              {"round": 0, "case": "c", "impl": "seed_ref", "steps": 230, "wall_s": 90.0},
              {"round": 1, "case": "c", "impl": "ours", "steps": 30, "failed": "x"},
              {"round": 1, "case": "c", "impl": "ours", "steps": 230, "wall_s": 70.0}]
    steps = whole_process.per_step(rounds, (30, 230))
    assert steps == [{"round": 0, "case": "c", "impl": "ours", "wall_s": 0.1},
                     {"round": 0, "case": "c", "impl": "seed_ref", "wall_s": 0.2}]
    (row,) = whole_process.summarize(steps)
    assert row["ratio"] == pytest.approx(2.0)


def test_whole_process_flags_for_ours_follow_the_case():
    args = type("Args", (), {"data": Path("d"), "arch": "small", "epochs": 1, "batch": 128, "seed_ref": Path("r"),
                             "set": ["ba_output=hard_ste", "codebook_weight=0", "dead_code_threshold=0.5"]})()
    ba = whole_process.ours_cmd({"quantizer": "ba_vq", "K": 512, "ba_iters": 1}, args, Path("o"), "n", steps=30)
    vq = whole_process.ours_cmd({"quantizer": "vq_ema", "K": 512, "ba_iters": 1}, args, Path("o"), "n")
    assert ba[ba.index("--max_steps") + 1] == "30" and "--epochs" not in ba
    assert ba[ba.index("--ba_output") + 1] == "hard_ste" and ba[ba.index("--codebook_weight") + 1] == "0"
    assert "--ba_output" not in vq and "--ba_iters" not in vq and vq[vq.index("--dead_code_threshold") + 1] == "0.5"
    assert whole_process.reference_cmd({"quantizer": "ba_vq", "K": 512, "ba_iters": 1}, args, 30)[-4:] == [
        "--steps", "30", "--batch", "128"]


def test_whole_process_benchmark_runs_end_to_end(tmp_path):
    from test_data import write_image

    for split, n in (("train", 8), ("test", 4)):
        for i in range(n):
            write_image(tmp_path / "imgs" / split / f"{i}.png")
    reference = tmp_path / "reference.py"  # a stand-in trainer: checks its arguments, then idles
    reference.write_text("import sys, time\nassert sys.argv[2:4] == ['--arch', 'small'] and '--epochs' in sys.argv\n"
                         "time.sleep(0.5)\n")
    out = tmp_path / "wp.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "whole_process.py"), "--data", str(tmp_path / "imgs"),
                    "--seed_ref", str(reference), "--case", "vq_ema:16", "--case", "ba_vq:16:2", "--batch", "4",
                    "--out", str(out)], check=True, capture_output=True, text=True, timeout=300)
    result = json.loads(out.read_text())
    assert [(r["case"], r["impl"]) for r in result["rounds"]] == [
        ("vq_ema K=16", "ours"), ("vq_ema K=16", "seed_ref"), ("ba_vq K=16 ba_iters=2", "ours"),
        ("ba_vq K=16 ba_iters=2", "seed_ref")]
    for r in result["rounds"]:
        assert "failed" not in r and r["wall_s"] > 0 and r["peak_rss_gib"] > 0
    for row in result["rows"]:
        assert set(row["ours_seconds"]) == set(vqvae.PHASES) | {"outside_train"}
        assert row["ratio"] == pytest.approx(row["seed_ref_wall_s"] / row["ours_wall_s"])


@pytest.mark.skipif(not vqvae.glibc_malloc(), reason="glibc's malloc only")
def test_page_fault_benchmark_runs_both_mallocs_end_to_end(tmp_path):
    from test_data import write_image

    for i in range(16):
        write_image(tmp_path / "imgs" / "train" / f"{i}.png")
    out = tmp_path / "pf.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "page_faults.py"), "--data", str(tmp_path / "imgs"),
                    "--K", "16", "--batch", "4", "--warmup", "1", "--steps", "2", "--rounds", "2", "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=300)
    result = json.loads(out.read_text())
    assert [(r["round"], r["malloc"]) for r in result["rounds"]] == [(0, "glibc"), (0, "kept"), (1, "glibc"), (1, "kept")]
    assert all(r["s_per_step"] > 0 and r["faults_per_step"] >= 0 and r["peak_rss_gib"] > 0 for r in result["rounds"])
    glibc, kept = ([r["s_per_step"] for r in result["rounds"] if r["malloc"] == m] for m in ("glibc", "kept"))
    assert result["summary"]["ratios"] == pytest.approx([g / k for g, k in zip(glibc, kept)])
    assert result["machine"]["commit"]
