"""Training speed and peak memory, side by side in one run: this project's trainer,
vector-quantize-pytorch's VectorQuantize and, when given one with --seed_ref, a reference trainer
written after the original design documents (any script taking `DATA --arch --quantizer --K
--ba_iters --steps --batch` and printing a JSON line with train_images_per_s).

    pip install -r bench/requirements.txt                                   # the library, for comparison
    python bench/bench.py --data path/to/cifar10-jpeg --plot bench/scaling.png   # the whole matrix
    python bench/bench.py --data path/to/cifar10-jpeg --arch small --K 512 16384 --quantizer vq_ema
    python bench/bench.py --data path/to/cifar10-jpeg --seed_ref path/to/seed_ref.py   # with the reference
    python bench/bench.py --data path/to/cifar10-jpeg --arch small --K 16384 --ba_iters 1 --beta 1 100 \
        --set beta_units=relative ba_prior=running ba_output=hard_ste ba_codebook_update=ema \
              entropy_weight=0 dead_code_threshold=0.03      # a run's settings, β held, from a fresh k-means start
    python bench/bench.py --data path/to/cifar10-jpeg --start_from experiments/S/vq_run/last.pt \
        experiments/S/ba_run/last.pt --repeat 3  # late in training: each run goes on, optimizer state and all

Every measurement runs in a fresh subprocess, one after the other, so its peak resident memory is
its own (read from the kernel with wait4) and no two compete for the cores. Training images/s is
the mean over up to --steps optimizer steps (or about --seconds) after --warmup steps, with the
data already resident. seed_ref times itself the same way (mean after 5 warm-up steps, its
DataLoader included: that is its design) over 30 steps at K ≤ 2048, 10 at 16,384 and 4 above.
Ratios are taken pair by pair at equal arch / K / batch / ba_iters. Results: a table and JSON.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 2**30


# --- what one subprocess measures ---------------------------------------------------------------


def images_per_second(step, device, args, batch_size: int) -> float:
    """Mean training images/s over up to args.steps steps after args.warmup, stopping early once
    args.seconds have passed (checked every 5 steps, after a device sync)."""
    import vqvae

    for i in range(args.warmup):
        step(i)
    vqvae.sync(device)
    done, t0 = 0, time.perf_counter()
    while done < args.steps and (done == 0 or time.perf_counter() - t0 < args.seconds):
        n = min(5, args.steps - done)
        for i in range(done, done + n):
            step(args.warmup + i)
        done += n
        vqvae.sync(device)
    return done * batch_size / (time.perf_counter() - t0)


def parse_settings(pairs: list) -> dict:
    """--set KEY=VALUE ... as config values (YAML-typed: 0.03 a float, true a bool, relative a string)."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set takes KEY=VALUE, got {pair!r}")
        out[key] = yaml.safe_load(value)
    return out


def read_trained(path) -> dict:
    """A run's final_model.pt, read weights-only, or its last.pt (optimizer state too), which needs a full
    unpickle: pass last.pt of your own runs only."""
    import vqvae

    return vqvae.read_model_state(path, trusted=Path(path).name == "last.pt")


def measure_ours(args) -> dict:
    import torch

    import vqvae

    # codes seeded from encoder outputs (k-means++ without Lloyd steps, untimed), as in real runs:
    # the ±1/K uniform init makes activations tiny and, on CPU, slows the steps with denormals
    settings = vqvae.applicable(parse_settings(args.set), args.quantizer)
    if args.quantizer == "ba_vq":
        settings |= {"ba_iters": args.ba_iters} | ({"beta_start": args.beta[0], "beta_end": args.beta[0]} if args.beta else {})
    overrides = dict(batch_size=args.batch, device=args.device, compile=args.compile)
    if args.start_from:  # a trained model's settings and state; its β stays where its run ended
        saved = read_trained(args.start_from[0])
        cfg = vqvae.load_config(base=saved["config"], overrides=overrides)
    else:
        cfg = vqvae.load_config(overrides=overrides | settings | dict(
            arch=args.arch, quantizer=args.quantizer, codebook_size=args.K, precision=args.precision, kmeans_iters=0))
    device = vqvae.pick_device(cfg.device)
    data = vqvae.np.load(args.data)
    x_train = vqvae.to_device_uint8(data["x_train"], device)
    x_test = vqvae.to_device_uint8(data["x_test"], device)
    model = vqvae.build_model(cfg, device)
    optimizer = vqvae.make_optimizer(model, cfg)
    gen = torch.Generator(device=device).manual_seed(0)
    if args.start_from:
        model.load_state_dict(saved["model"])
        if "optimizer" in saved:  # a run's last.pt: AdamW's moments go on too, as in the run itself
            optimizer.load_state_dict(saved["optimizer"])
    else:
        vqvae.init_codebook_from_data(model, x_train, cfg, gen)
    perm = torch.randperm(len(x_train), generator=gen, device=device)

    def step(i):
        vqvae.train_step(model, optimizer, vqvae.get_batch(x_train, perm, i, cfg.batch_size, cfg.channels_last),
                         cfg.precision)

    images_per_s = images_per_second(step, device, args, cfg.batch_size)
    result = {"train_images_per_s": images_per_s}
    if args.start_from:
        result["quantizer_state"] = model.quantizer.log_values()  # e.g. BA's β, still where its run ended
        result["continues_optimizer"] = "optimizer" in saved
    if args.K in args.eval_K:  # the whole validation set, timed against one epoch at this speed
        vqvae.evaluate(model, x_test[:cfg.eval_batch_size], cfg.eval_batch_size, cfg.precision)  # warm-up (compile)
        t0 = time.perf_counter()
        vqvae.evaluate(model, x_test, cfg.eval_batch_size, cfg.precision)
        vqvae.sync(device)
        result["eval_s"] = time.perf_counter() - t0
        result["eval_over_epoch"] = result["eval_s"] / (len(x_train) / images_per_s)
    return result


def measure_library(args) -> dict:
    """VectorQuantize (EMA, k-means init, plain straight-through) inside our small model."""
    import torch
    import torch.nn.functional as F
    from vector_quantize_pytorch import VectorQuantize

    import vqvae

    cfg = vqvae.load_config(overrides=dict(arch="small", codebook_size=args.K, batch_size=args.batch, device=args.device))
    device = vqvae.pick_device(cfg.device)
    torch.manual_seed(0)
    encoder, decoder = vqvae.make_encoder("small", cfg.n_hid, cfg.latent_dim), vqvae.make_decoder("small", cfg.n_hid, cfg.latent_dim)
    vq = VectorQuantize(dim=cfg.latent_dim, codebook_size=args.K, decay=0.99, commitment_weight=0.25,
                        kmeans_init=True, kmeans_iters=10, rotation_trick=False, accept_image_fmap=True)
    encoder, decoder, vq = encoder.to(device), decoder.to(device), vq.to(device)
    params = list(encoder.parameters()) + list(decoder.parameters()) + [p for p in vq.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    data = vqvae.np.load(args.data)
    x_train = vqvae.to_device_uint8(data["x_train"], device)
    perm = torch.randperm(len(x_train), device=device)

    def step(i):  # the first one runs the library's k-means init
        x = vqvae.get_batch(x_train, perm, i, cfg.batch_size)
        z_q, _, commit = vq(encoder(x))
        loss = F.mse_loss(decoder(z_q), x) + commit.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return {"train_images_per_s": images_per_second(step, device, args, cfg.batch_size)}


# --- the driver ---------------------------------------------------------------------------------


def run_child(cmd, timeout) -> dict:
    """Run one measurement; its last stdout line is JSON. Adds its own peak RSS (GiB)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.time() > deadline:
            proc.kill()
            os.wait4(proc.pid, 0)
            return {"skipped": f"over the {timeout}s limit"}
        time.sleep(0.2)
    out, err = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        return {"skipped": "failed: " + (err.strip().splitlines() or ["?"])[-1][:200]}
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_gib"] = usage.ru_maxrss * 1024 / GIB  # ru_maxrss is in KiB on Linux
    return result


def seed_ref_fits(arch, quantizer, K, ba_iters, batch, budget_gib) -> bool:
    """seed_ref keeps several N×K fp32 matrices alive (distances, one-hot or softmax per BA
    iteration): a rough count tells which settings cannot fit in memory at all."""
    n = batch * 64
    matrices = 4 if quantizer == "vq_ema" else 4 * ba_iters + 2
    return matrices * n * K * 4 / GIB < budget_gib


def write_npz(data_dir: Path, path: Path) -> None:
    import numpy as np

    import vqvae

    np.savez(path, x_train=vqvae.load_image_folder(data_dir, "train"), x_test=vqvae.load_image_folder(data_dir, "test"))


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="image folder with train/ and test/ (e.g. the CIFAR-10 JPEG copy) or an .npz")
    ap.add_argument("--arch", nargs="+", default=["small", "resnet"])
    ap.add_argument("--quantizer", nargs="+", help="vq_ema and ba_vq by default; none beside --start_from unless named")
    ap.add_argument("--K", nargs="+", type=int, default=[512, 2048, 16384, 65536])
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--ba_iters", nargs="+", type=int, default=[1, 5], help="BA iterations (beyond the first, small arch only)")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="config values for our runs (each quantizer takes those that apply to it), "
                         "e.g. --set beta_units=relative ba_prior=running dead_code_threshold=0.03")
    ap.add_argument("--beta", nargs="+", type=float, default=[],
                    help="also: our BA with β held at each value (beta_start = beta_end), one row each")
    ap.add_argument("--start_from", nargs="+", default=[], metavar="MODEL",
                    help="ours continuing from each trained model (a run's final_model.pt: its settings, weights, "
                         "codebook, prior, σ and β as the run ended; its last.pt: the optimizer's state too, as the "
                         "run would go on), one row each: step times late in training; "
                         "the matrix runs beside them only for the quantizers named by --quantizer")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=50, help="at most this many timed steps per measurement of ours and the library")
    ap.add_argument("--seconds", type=float, default=15.0, help="stop timing ours and the library after about this long")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=1, help="rounds of the whole plan, interleaved; rows report the median")
    ap.add_argument("--eval_K", nargs="+", type=int, default=[512], help="codebook sizes at which ours also times validation")
    ap.add_argument("--seed_ref", metavar="SCRIPT", help="also time this reference trainer (none by default)")
    ap.add_argument("--no_library", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also measure ours with --compile (bf16)")
    ap.add_argument("--memory_budget_gib", type=float, default=20.0, help="skip seed_ref settings predicted above this")
    ap.add_argument("--timeout", type=int, default=900, help="seconds allowed for one measurement")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results.json"))
    ap.add_argument("--plot", help="also draw images/s and peak memory against K into this PNG")
    ap.add_argument("--device", default="cpu", help="cpu or cuda; seed_ref runs on the CPU only, so it is skipped elsewhere")
    ap.add_argument("--report", metavar="JSON", help="print the tables of an earlier run's JSON as Markdown, and stop")
    ap.add_argument("--worker", choices=["ours", "library"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quantizer is None:
        args.quantizer = [] if args.start_from else ["vq_ema", "ba_vq"]
    if not (args.data or args.report):
        ap.error("--data is required: the image folder (e.g. /tmp/cifar10-jpeg) or an .npz of x_train/x_test")
    return args


def plan(args, data: Path) -> list:
    """(row, command or None, reason) for every measurement, in the order they run."""
    common = ["--data", str(data), "--batch", str(args.batch), "--eval_K", *map(str, args.eval_K),
              "--warmup", str(args.warmup), "--seconds", str(args.seconds), "--device", args.device]
    slow_steps = lambda K: 30 if K <= 2048 else 10 if K <= 16384 else 4  # noqa: E731  seed_ref, library
    out = []
    for path in args.start_from:
        cfg = read_trained(path)["config"]
        row = {"arch": cfg["arch"], "quantizer": cfg["quantizer"], "K": cfg["codebook_size"], "impl": "ours",
               "ba_iters": cfg["ba_iters"] if cfg["quantizer"] == "ba_vq" else 1, "precision": cfg["precision"],
               "from": Path(path).parent.name}
        out.append((row, [sys.executable, __file__, "--worker", "ours", "--start_from", str(path), "--arch", row["arch"],
                          "--quantizer", row["quantizer"], "--K", str(row["K"]), "--steps", str(args.steps)] + common, None))
    for arch in args.arch:
        for quantizer in args.quantizer:
            iters_list = args.ba_iters if quantizer == "ba_vq" else [1]
            for ba_iters in iters_list if arch == "small" else iters_list[:1]:
                for K in args.K:
                    base = {"arch": arch, "quantizer": quantizer, "K": K, "ba_iters": ba_iters}
                    variants = [(p, False) for p in args.precision] + ([("bf16", True)] if args.compile else [])
                    betas = args.beta if quantizer == "ba_vq" and args.beta else [None]
                    for (precision, compiled), beta in ((v, b) for v in variants for b in betas):
                        cmd = [sys.executable, __file__, "--worker", "ours", "--arch", arch, "--quantizer", quantizer,
                               "--K", str(K), "--ba_iters", str(ba_iters), "--precision", precision,
                               "--steps", str(args.steps)] + common + (["--compile"] if compiled else [])
                        cmd += (["--set", *args.set] if args.set else []) + (["--beta", str(beta)] if beta else [])
                        row = base | {"impl": "ours", "precision": precision + ("+compile" if compiled else "")}
                        out.append((row | ({"beta": beta} if beta else {}), cmd, None))
                    if args.seed_ref:
                        row = base | {"impl": "seed_ref", "precision": "fp32"}
                        if args.device != "cpu":
                            out.append((row, None, "seed_ref runs on the CPU only"))
                        elif not seed_ref_fits(arch, quantizer, K, ba_iters, args.batch, args.memory_budget_gib):
                            out.append((row, None, f"predicted > {args.memory_budget_gib:.0f} GiB"))
                        else:
                            out.append((row, [sys.executable, str(args.seed_ref), str(data), "--arch", arch, "--quantizer",
                                              quantizer, "--K", str(K), "--ba_iters", str(ba_iters),
                                              "--steps", str(slow_steps(K)), "--batch", str(args.batch)], None))
                    if not args.no_library and arch == "small" and quantizer == "vq_ema":
                        out.append((base | {"impl": "library", "precision": "fp32"},
                                    [sys.executable, __file__, "--worker", "library", "--K", str(K),
                                     "--steps", str(slow_steps(K))] + common, None))
    return out


def main():
    args = parse_args()
    if args.report:
        print(markdown_report(json.loads(Path(args.report).read_text())))
        return
    if args.worker:  # one measurement, inside a child process
        if args.worker == "ours":
            import torch

            import vqvae

            torch.set_flush_denormal(True)  # as train.py runs, before any thread pool starts
            vqvae.keep_freed_memory()       # as train.py runs
        one = {"ours": measure_ours, "library": measure_library}[args.worker]
        args.arch, args.quantizer, args.K = args.arch[0], args.quantizer[0], args.K[0]
        args.precision, args.ba_iters = args.precision[0], args.ba_iters[0]
        print(json.dumps(one(args)))
        return

    data, tmp = Path(args.data), None
    if data.is_dir():  # decode once (vqvae's cache) into one .npz that every child reads
        tmp = tempfile.NamedTemporaryFile(suffix=".npz", delete=False)
        write_npz(data, Path(tmp.name))
        data = Path(tmp.name)
    import torch

    machine = machine_facts() | {"device": args.device}
    if args.device.startswith("cuda"):
        machine["gpu"] = torch.cuda.get_device_name(0)
    print(f"machine: {machine}\n" + HEADER, flush=True)
    todo = plan(args, data)
    runs = [[] for _ in todo]
    for repeat in range(args.repeat):  # interleaved, so a slow spell of the machine hits every trainer
        if args.repeat > 1:
            print(f"-- round {repeat + 1} of {args.repeat}", flush=True)
        for (row, cmd, reason), results in zip(todo, runs):
            results.append(run_child(cmd, args.timeout) if cmd else {"skipped": reason})
            print(format_row(row | results[-1]), flush=True)
    rows = [row | combine(results) for (row, _, _), results in zip(todo, runs)]
    if args.repeat > 1:
        print(f"\nmedians over {args.repeat} rounds:\n{HEADER}")
        for row in rows:
            print(format_row(row))
    ratios = compute_ratios(rows)
    print("\nratios (pair by pair, same arch / K / batch / ba_iters):")
    for r in ratios:
        print(f"  {r['what']}: {r['ratio']:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine, "args": vars(args), "rows": rows, "ratios": ratios}, indent=1))
    print(f"wrote {args.out}")
    if args.plot:
        plot_scaling(rows, Path(args.plot))
        print(f"wrote {args.plot}")
    if tmp:
        os.unlink(tmp.name)


HEADER = f"{'arch':7} {'quantizer':9} {'iters':>5} {'K':>6} {'impl':11} {'precision':13} {'img/s':>8} {'peak GiB':>9} {'eval/epoch':>10}"


def combine(results: list) -> dict:
    """One row from the rounds of one measurement: median speed (and eval share), largest peak memory."""
    import statistics

    done = [r for r in results if "skipped" not in r]
    if not done:
        return results[-1]
    out = {"train_images_per_s": statistics.median(r["train_images_per_s"] for r in done),
           "peak_rss_gib": max(r["peak_rss_gib"] for r in done),
           "rounds_images_per_s": [r["train_images_per_s"] for r in done]}
    for key in ("quantizer_state", "continues_optimizer"):  # rows continuing a trained run
        if key in done[0]:
            out[key] = done[0][key]
    if "eval_over_epoch" in done[0]:
        out["eval_s"] = statistics.median(r["eval_s"] for r in done)
        out["eval_over_epoch"] = statistics.median(r["eval_over_epoch"] for r in done)
    return out


def held_beta(r) -> str:
    """ " β=…" for a row whose BA ran with β held by --beta, " from RUN" for one that continued a trained model, else ""."""
    return f" β={r['beta']:g}" if "beta" in r else f" from {r['from']}" if "from" in r else ""


def trainer(r) -> str:
    """The trainer of a row, with the β it was held at when --beta gave one."""
    return r["impl"] + held_beta(r)


def format_row(r) -> str:
    head = f"{r['arch']:7} {r['quantizer']:9} {r['ba_iters']:>5} {r['K']:>6} {trainer(r):11} {r['precision']:13}"
    if "skipped" in r:
        return f"{head} skipped: {r['skipped']}"
    ratio = f"{r['eval_over_epoch']:>10.3f}" if "eval_over_epoch" in r else f"{'':>10}"
    return f"{head} {r['train_images_per_s']:>8.1f} {r['peak_rss_gib']:>9.2f} {ratio}"


def compute_ratios(rows) -> list:
    """Pair by pair at equal arch / K / batch / ba_iters: ours / seed_ref speed and peak memory,
    ours / library speed, and the per-step cost of ba_vq relative to vq_ema (same precision)."""
    def key(r):
        return (r["arch"], r["quantizer"], r["ba_iters"], r["K"])

    done = [r for r in rows if "skipped" not in r]
    seed = {key(r): r for r in done if r["impl"] == "seed_ref"}
    library = {(r["arch"], r["K"]): r for r in done if r["impl"] == "library"}
    vq_ema = {(r["arch"], r["K"], r["precision"]): r for r in done if r["impl"] == "ours" and r["quantizer"] == "vq_ema"}
    out = []
    for r in done:
        if r["impl"] != "ours":
            continue
        name = f"{r['arch']} {r['quantizer']} iters={r['ba_iters']} K={r['K']} {r['precision']}{held_beta(r)}"
        if key(r) in seed:
            s = seed[key(r)]
            out.append({"what": f"{name} speed ours/seed_ref", "ratio": r["train_images_per_s"] / s["train_images_per_s"]})
            out.append({"what": f"{name} memory ours/seed_ref", "ratio": r["peak_rss_gib"] / s["peak_rss_gib"]})
        if r["quantizer"] == "vq_ema" and (r["arch"], r["K"]) in library:
            lib = library[(r["arch"], r["K"])]
            out.append({"what": f"{name} speed ours/library", "ratio": r["train_images_per_s"] / lib["train_images_per_s"]})
        if r["quantizer"] == "ba_vq" and (r["arch"], r["K"], r["precision"]) in vq_ema:
            v = vq_ema[(r["arch"], r["K"], r["precision"])]
            out.append({"what": f"{name} step time ba_vq/vq_ema", "ratio": v["train_images_per_s"] / r["train_images_per_s"]})
    return out


def markdown_report(result: dict) -> str:
    """The rows and ratios of a run as Markdown tables, for BENCHMARKS.md."""
    lines = ["| arch | quantizer | ba_iters | K | trainer | precision | images/s | peak RSS GiB | eval / epoch |",
             "|---|---|---:|---:|---|---|---:|---:|---:|"]
    for r in result["rows"]:
        head = f"| {r['arch']} | {r['quantizer']} | {r['ba_iters']} | {r['K']} | {trainer(r)} | {r['precision']} |"
        if "skipped" in r:
            lines.append(f"{head} skipped: {r['skipped']} | | |")
        else:
            share = f"{r['eval_over_epoch']:.3f}" if "eval_over_epoch" in r else ""
            lines.append(f"{head} {r['train_images_per_s']:.1f} | {r['peak_rss_gib']:.2f} | {share} |")
    lines += ["", "| pair | ratio |", "|---|---:|"]
    lines += [f"| {r['what']} | {r['ratio']:.2f} |" for r in result["ratios"]]
    return "\n".join(lines)


def plot_scaling(rows, path: Path) -> None:
    """images/s and peak memory against K, one line per trainer, for the small arch in fp32."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_speed, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
    lines = {}
    for r in rows:
        if "skipped" not in r and r["arch"] == "small" and r["precision"] in ("fp32", "bf16"):
            label = f"{r['impl']} {r['quantizer']}" + (f" iters={r['ba_iters']}" if r["quantizer"] == "ba_vq" else "")
            label += f" {r['precision']}" if r["impl"] == "ours" else ""
            lines.setdefault(label, []).append(r)
    for label, rs in sorted(lines.items()):
        rs.sort(key=lambda r: r["K"])
        Ks = [r["K"] for r in rs]
        style = "-" if "ours" in label else "--"
        ax_speed.plot(Ks, [r["train_images_per_s"] for r in rs], style, marker="o", label=label)
        ax_mem.plot(Ks, [r["peak_rss_gib"] for r in rs], style, marker="o", label=label)
    for ax, title in ((ax_speed, "training images/s"), (ax_mem, "peak resident memory (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("codebook size K")
        ax.set_title(f"small arch, batch 128: {title}")
        ax.grid(True, which="both", alpha=0.3)
    ax_speed.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _cpu_name() -> str:
    """The CPU's model name, with its family and whether it multiplies bf16 natively (AVX-512 BF16 or
    AMX), which decides the bf16 screen's speed: e.g. "AMD EPYC (CPU family 26, native bf16)"."""
    facts = {}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            facts.setdefault(key.strip(), value.strip())
    except OSError:
        import platform

        return platform.processor()
    flags = facts.get("flags", "").split()
    bf16 = "native bf16" if {"avx512_bf16", "amx_bf16"} & set(flags) else "no native bf16"
    return f"{facts.get('model name', '?')} (CPU family {facts.get('cpu family', '?')}, {bf16})"


def machine_facts() -> dict:
    """What a result file records about where and how it was measured."""
    import torch

    return {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv), "commit": _commit()}


def _commit() -> str:
    """The repository's commit, with "+changes" when vqvae.py or bench/*.py differ from it."""
    def git(*args):
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+changes" if git("status", "--porcelain", "vqvae.py", "bench/*.py") else "")


if __name__ == "__main__":
    main()
