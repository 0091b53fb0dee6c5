"""Whole-process speed: this project's `train.py` against a reference trainer, each run the way a user
runs it, on the same image folder and for the same number of epochs, one process after the other.
Wall time counts everything the process does: interpreter start and imports, loading the data,
k-means seeding of the codebook (ours), the training steps, validation, checkpoint and result files.
Ours also says where its time went (final_metrics.json "seconds"); what is left of its wall time is
the interpreter, imports and exit. The ratio is reference wall time / ours, round by round, and
the rounds are interleaved so that a slow spell of a shared machine hits both.

    python bench/whole_process.py --data /path/to/cifar10-jpeg --seed_ref path/to/seed_ref.py \\
        --case vq_ema:16384 --case ba_vq:512:1 --rounds 2 --out bench/whole_process.json
    python bench/whole_process.py --data /path/to/cifar10-jpeg --seed_ref path/to/seed_ref.py \\
        --case ba_vq:512:1 --steps 30 230 --rounds 3 --out bench/whole_process-steps.json   # per step

A case is QUANTIZER:K[:BA_ITERS] (ba_iters 1 unless given). The reference is any script taking
`DATA --arch --quantizer --K --ba_iters --epochs` that trains and validates once (the seed design's
reference trainer does). Ours reads the folder through its decode cache, which the driver fills
before timing (as after any first run on a folder); a reference that decodes the images every time
pays for that in its wall time: that is its design.
"""
import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 2**30


def bench_module():
    """bench.py, for the machine facts it records (CPU name, commit)."""
    spec = importlib.util.spec_from_file_location("bench_matrix", ROOT / "bench" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_case(text: str) -> dict:
    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[0] not in ("vq_ema", "ba_vq"):
        raise SystemExit(f"--case {text!r}: expected QUANTIZER:K[:BA_ITERS], QUANTIZER vq_ema or ba_vq")
    return {"quantizer": parts[0], "K": int(parts[1]), "ba_iters": int(parts[2]) if len(parts) == 3 else 1}


def timed_process(cmd: list, timeout: float) -> dict:
    """Wall seconds and peak resident memory (GiB) of one process; its output is kept in `log`."""
    with tempfile.TemporaryFile("w+") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, text=True)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > timeout:
                proc.kill()
                os.wait4(proc.pid, 0)
                return {"failed": f"over the {timeout:.0f}s limit"}
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        log.seek(0)
        output = log.read()
    if os.waitstatus_to_exitcode(status) != 0:
        return {"failed": (output.strip().splitlines() or ["?"])[-1][:300]}
    return {"wall_s": wall, "peak_rss_gib": usage.ru_maxrss * 1024 / GIB}  # ru_maxrss: KiB on Linux


def ours_cmd(case: dict, args, out_dir: Path, name: str, steps: int = 0) -> list:
    """train.py for the case: --epochs, or with steps > 0 that many steps (--max_steps); --set values
    that apply to the case's quantizer become flags."""
    import vqvae

    length = ["--max_steps", str(steps)] if steps else ["--epochs", str(args.epochs)]
    settings = vqvae.applicable(dict(pair.split("=", 1) for pair in args.set), case["quantizer"])
    flags = [text for key, value in settings.items() for text in (f"--{key}", value)]
    return [sys.executable, str(ROOT / "train.py"), "--dataset", "folder", "--data_dir", str(args.data),
            "--arch", args.arch, "--quantizer", case["quantizer"], "--codebook_size", str(case["K"]),
            *(["--ba_iters", str(case["ba_iters"])] if case["quantizer"] == "ba_vq" else []), *length,
            "--batch_size", str(args.batch), "--no_wandb", "--out_dir", str(out_dir), "--name", name, *flags]


def reference_cmd(case: dict, args, steps: int = 0) -> list:
    """The reference for the case: --epochs, or with steps > 0 its throughput mode (5 warm-up steps, then steps)."""
    length = ["--steps", str(steps)] if steps else ["--epochs", str(args.epochs)]
    return [sys.executable, str(args.seed_ref), str(args.data), "--arch", args.arch, "--quantizer", case["quantizer"],
            "--K", str(case["K"]), "--ba_iters", str(case["ba_iters"]), *length, "--batch", str(args.batch)]


def measure_ours(case: dict, args, out_dir: Path, name: str, steps: int = 0) -> dict:
    result = timed_process(ours_cmd(case, args, out_dir, name, steps), args.timeout)
    if "failed" not in result:
        final = json.loads((out_dir / name / "final_metrics.json").read_text())
        result["seconds"] = final["seconds"]
        result["seconds"]["outside_train"] = result["wall_s"] - sum(final["seconds"].values())
        result["train_images_per_s"] = final["train_images_per_s"]
    return result


def per_step(rounds: list, lengths: tuple) -> list:
    """With two run lengths (steps) per case, trainer and round: the seconds per step as the difference
    of their wall times over the difference of their lengths (start-up, data, seeding, validation and
    result files cancel). One record per case, trainer and round, shaped like a round."""
    short, long = lengths
    out = []
    for r in rounds:
        if r.get("steps") != long or "failed" in r:
            continue
        mate = next((q for q in rounds if q.get("steps") == short and q["round"] == r["round"]
                     and q["case"] == r["case"] and q["impl"] == r["impl"] and "failed" not in q), None)
        if mate:
            out.append({"round": r["round"], "case": r["case"], "impl": r["impl"],
                        "wall_s": (r["wall_s"] - mate["wall_s"]) / (long - short)})
    return out


def summarize(rounds: list) -> list:
    """Per case: the median wall time of each trainer and the median of the per-round ratios."""
    rows = []
    for case in {r["case"]: None for r in rounds}:
        ours = [r for r in rounds if r["case"] == case and r["impl"] == "ours" and "failed" not in r]
        ref = [r for r in rounds if r["case"] == case and r["impl"] == "seed_ref" and "failed" not in r]
        row = {"case": case, "ours_wall_s": statistics.median(r["wall_s"] for r in ours) if ours else None}
        if ref:
            by_round = {r["round"]: r["wall_s"] for r in ref}
            ratios = [by_round[r["round"]] / r["wall_s"] for r in ours if r["round"] in by_round]
            row |= {"seed_ref_wall_s": statistics.median(by_round.values()), "ratios": ratios,
                    "ratio": statistics.median(ratios) if ratios else None}
        if ours and "seconds" in ours[0]:
            row["ours_seconds"] = {k: statistics.median(r["seconds"][k] for r in ours) for k in ours[0]["seconds"]}
        rows.append(row)
    return rows


def markdown(rows: list) -> str:
    phases = list(rows[0].get("ours_seconds", {})) if rows else []
    lines = ["| case | seed_ref wall (s) | ours wall (s) | ratio (per round) | ours: " + " / ".join(phases) + " (s) |",
             "|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['ratio']:.2f} ({', '.join(f'{x:.2f}' for x in r['ratios'])})" if r.get("ratio") else "—"
        ref = f"{r['seed_ref_wall_s']:.1f}" if r.get("seed_ref_wall_s") else "—"
        ours = f"{r['ours_wall_s']:.1f}" if r["ours_wall_s"] is not None else "failed"
        split = " / ".join(f"{r['ours_seconds'][p]:.1f}" for p in phases) if "ours_seconds" in r else "—"
        lines.append(f"| {r['case']} | {ref} | {ours} | {ratio} | {split} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="image folder with train/ and test/")
    ap.add_argument("--seed_ref", type=Path, help="reference trainer script (without it, ours alone is timed)")
    ap.add_argument("--case", action="append", type=parse_case, help="QUANTIZER:K[:BA_ITERS], repeatable")
    ap.add_argument("--arch", default="small")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--steps", type=int, nargs=2, metavar=("SHORT", "LONG"),
                    help="instead of epochs: each case at two lengths, and the seconds per step from the difference")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="config values for ours (each quantizer takes those that apply to it)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "whole_process.json")
    args = ap.parse_args()
    cases = args.case or [parse_case("vq_ema:16384"), parse_case("ba_vq:512:1")]

    import vqvae

    for split in ("train", "test"):  # fill ours' decode cache before any timing
        vqvae.load_image_folder(args.data, split)
    machine = bench_module().machine_facts()
    print(f"machine: {machine}", flush=True)
    rounds = []
    with tempfile.TemporaryDirectory() as out_dir:
        for i in range(args.rounds):
            for case in cases:
                label = f"{case['quantizer']} K={case['K']}" + (f" ba_iters={case['ba_iters']}" if case["quantizer"] == "ba_vq" else "")
                name = f"{case['quantizer']}_K{case['K']}_i{case['ba_iters']}_r{i}"
                for steps in args.steps or [0]:
                    jobs = [("ours", lambda: measure_ours(case, args, Path(out_dir), f"{name}_s{steps}", steps))]
                    if args.seed_ref:
                        jobs.append(("seed_ref", lambda: timed_process(reference_cmd(case, args, steps), args.timeout)))
                    for impl, job in jobs:
                        rounds.append({"round": i, "case": label, "impl": impl} | ({"steps": steps} if steps else {}) | job())
                        print(json.dumps(rounds[-1]), flush=True)
    rows = summarize(per_step(rounds, args.steps) if args.steps else rounds)
    print(("\nseconds per step (wall-time difference of the two lengths):\n" if args.steps else "\n") + markdown(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
                                    "rounds": rounds, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
