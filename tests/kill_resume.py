"""Kill a real training process at chosen steps, resume it, and compare with an uninterrupted run.

    python tests/kill_resume.py --kills 8      # 8 kill points, SIGKILL and SIGINT, runs in a new temp dir

Each trial starts `train.py` on a small synthetic run (saving last.pt every 3 steps), waits until
its history shows the chosen step, sends SIGKILL or SIGINT, then runs `train.py --resume` until the
end. The trial passes when final_metrics.json (timings aside) and every tensor of final_model.pt
are bitwise equal to those of an uninterrupted run with the same seed. tests/test_reliability.py
runs two trials of it; this script runs as many as asked.
"""
import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RUN = ["--dataset", "synthetic", "--synthetic_size", "512", "--batch_size", "32", "--epochs", "3",
       "--codebook_size", "32", "--n_hid", "16", "--latent_dim", "8", "--log_every", "1", "--eval_batch_size", "64",
       "--save_every_steps", "3", "--checkpoint_freq", "0", "--no_wandb", "--device", "cpu"]
TOTAL_STEPS = 3 * (512 // 32)
TIMING = ("train_time_s", "train_images_per_s", "seconds")


def train_cmd(out: Path, name: str, quantizer: str, *extra) -> list:
    return [sys.executable, "train.py", *RUN, "--quantizer", quantizer, "--out_dir", str(out), "--name", name, *extra]


def last_logged_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "history.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in lines if line.endswith("}")]
    return max(steps, default=0)


def outcome(run_dir: Path):
    final = json.loads((run_dir / "final_metrics.json").read_text())
    model = torch.load(run_dir / "final_model.pt", map_location="cpu", weights_only=False)["model"]
    return {k: v for k, v in final.items() if k not in TIMING}, model


def same(a, b) -> bool:
    (fa, ma), (fb, mb) = a, b
    return fa == fb and ma.keys() == mb.keys() and all(
        torch.equal(ma[k], mb[k]) if isinstance(ma[k], torch.Tensor) else ma[k] == mb[k] for k in ma)


def trial(out: Path, quantizer: str, kill_at: int, sig: signal.Signals, reference) -> dict:
    name = f"{quantizer}_{sig.name}_{kill_at}"
    run_dir = out / name
    proc = subprocess.Popen(train_cmd(out, name, quantizer), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and last_logged_step(run_dir) < kill_at:
        time.sleep(0.005)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    killed_after = last_logged_step(run_dir)
    saved = torch.load(run_dir / "last.pt", weights_only=False)["step"] if (run_dir / "last.pt").is_file() else None
    resumed = subprocess.run(train_cmd(out, name, quantizer, "--resume"), cwd=ROOT, capture_output=True, text=True,
                             timeout=600)
    if resumed.returncode != 0:
        raise RuntimeError(f"resume of {name} failed: {resumed.stderr[-2000:]}")
    return {"run": name, "signal": sig.name, "asked": kill_at, "stopped_after_step": killed_after,
            "last_pt_step": saved, "exit_code": proc.returncode, "stderr_tail": err.strip().splitlines()[-1:],
            "bitwise_equal": same(outcome(run_dir), reference)}


def run_trials(out: Path, kills: list) -> list:
    """kills: (quantizer, step, signal) triples. Returns one result dict per trial."""
    references, results = {}, []
    for quantizer, kill_at, sig in kills:
        if quantizer not in references:
            ref_name = f"{quantizer}_reference"
            subprocess.run(train_cmd(out, ref_name, quantizer), cwd=ROOT, check=True, capture_output=True, timeout=600)
            references[quantizer] = outcome(out / ref_name)
        results.append(trial(out, quantizer, kill_at, sig, references[quantizer]))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=8, help="number of kill points (alternating SIGKILL / SIGINT)")
    parser.add_argument("--out", help="directory for the runs, which must not exist yet (default: a new temporary one)")
    parser.add_argument("--seed", type=int, default=0, help="seed for choosing the kill steps")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="kill_resume_"))
    out.mkdir(parents=True, exist_ok=args.out is None)
    rng = random.Random(args.seed)
    kills = [(("vq_ema", "ba_vq")[i % 4 // 2], rng.randrange(4, TOTAL_STEPS - 1),
              (signal.SIGKILL, signal.SIGINT)[i % 2]) for i in range(args.kills)]
    results = run_trials(out, kills)
    print("| run | signal | asked step | last logged step | last.pt step | exit code | bitwise equal |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['run']} | {r['signal']} | {r['asked']} | {r['stopped_after_step']} | {r['last_pt_step']} "
              f"| {r['exit_code']} | {r['bitwise_equal']} |")
    print(f"{sum(r['bitwise_equal'] for r in results)} of {len(results)} resumed runs bitwise equal to the uninterrupted one")
    return 0 if all(r["bitwise_equal"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
