"""What keeping freed memory saves (`vqvae.keep_freed_memory`, which train.py calls): the same training
steps in two child processes, one with glibc's malloc as it is and one with freed blocks kept for
reuse, alternated over rounds so that a slow spell of a shared machine hits both. Each child reports
its seconds per step, the minor page faults per step (getrusage) and its peak resident memory.

    python bench/page_faults.py --data path/to/cifar10-jpeg --arch small --quantizer ba_vq --K 512 \\
        --rounds 4 --out bench/page-faults.json

Linux with glibc only (elsewhere `keep_freed_memory` changes nothing). The ratio is glibc's seconds
per step over kept's, round by round.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from whole_process import bench_module  # noqa: E402  (bench/, this script's folder, is on the path)

MALLOC = ("glibc", "kept")


def worker(args) -> dict:
    """Training steps in this process, after --warmup steps; the malloc setting is made before any tensor."""
    import torch

    import vqvae

    torch.set_flush_denormal(True)  # as train.py runs
    if args.worker == "kept" and not vqvae.keep_freed_memory():
        raise SystemExit("keep_freed_memory needs Linux with glibc")
    cfg = vqvae.load_config(overrides=dict(arch=args.arch, quantizer=args.quantizer, codebook_size=args.K,
                                           batch_size=args.batch, device="cpu", kmeans_iters=0))
    x_train = vqvae.to_device_uint8(vqvae.load_image_folder(args.data, "train"), torch.device("cpu"))
    model = vqvae.build_model(cfg, torch.device("cpu"))
    optimizer = vqvae.make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(0)
    vqvae.init_codebook_from_data(model, x_train, cfg, gen)  # codes from encoder outputs, as in real runs
    perm = torch.randperm(len(x_train), generator=gen)

    def step(i):
        vqvae.train_step(model, optimizer, vqvae.get_batch(x_train, perm, i, cfg.batch_size, cfg.channels_last), "fp32")

    for i in range(args.warmup):
        step(i)
    faults, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + i)
    seconds = (time.perf_counter() - t0) / args.steps
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"s_per_step": seconds, "faults_per_step": (usage.ru_minflt - faults) / args.steps,
            "peak_rss_gib": usage.ru_maxrss / 2**20}  # ru_maxrss: KiB on Linux


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="image folder with train/ (e.g. cifar10-jpeg)")
    ap.add_argument("--arch", default="small")
    ap.add_argument("--quantizer", default="ba_vq")
    ap.add_argument("--K", type=int, default=512)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per child")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", type=Path, help="JSON of every round and the medians")
    ap.add_argument("--worker", choices=MALLOC, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    machine = bench_module().machine_facts()  # as the other benchmarks record it, before the first child
    print(f"machine: {machine}", flush=True)
    cmd = [sys.executable, __file__, "--data", str(args.data), "--arch", args.arch, "--quantizer", args.quantizer,
           "--K", str(args.K), "--batch", str(args.batch), "--warmup", str(args.warmup), "--steps", str(args.steps)]
    rounds = []
    for r in range(args.rounds):
        for malloc in MALLOC:
            out = subprocess.run(cmd + ["--worker", malloc], capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                raise SystemExit(f"{malloc} child failed: {out.stderr.strip()[-500:]}")
            rounds.append({"round": r, "malloc": malloc} | json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rounds[-1]), flush=True)
    by = {m: [x for x in rounds if x["malloc"] == m] for m in MALLOC}
    ratios = [g["s_per_step"] / k["s_per_step"] for g, k in zip(by["glibc"], by["kept"])]
    summary = {m: {key: statistics.median(x[key] for x in by[m]) for key in ("s_per_step", "faults_per_step", "peak_rss_gib")}
               for m in MALLOC} | {"ratios": ratios, "ratio": statistics.median(ratios)}
    print("| malloc | s per step | page faults per step | peak RSS (GiB) |\n|---|---|---|---|")
    for m in MALLOC:
        s = summary[m]
        print(f"| {m} | {s['s_per_step']:.3f} | {s['faults_per_step']:.0f} | {s['peak_rss_gib']:.2f} |")
    print(f"glibc / kept per round: {', '.join(f'{x:.2f}' for x in ratios)} (median {summary['ratio']:.2f})")
    if args.out:
        args.out.write_text(json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
                                        "rounds": rounds, "summary": summary}, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
