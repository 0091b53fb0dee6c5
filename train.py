"""Train a VQ-VAE from the command line, or run a whole study.

    python train.py --config config_mac.yaml --quantizer ba_vq --codebook_size 1024
    python train.py --sweep sweeps/ba_study.yaml [--seeds N] [--flag value ...]
    python train.py --summarize experiments/ba_study

Every key of vqvae.Config is a flag; flags override the YAML file, which overrides the defaults.
With --sweep, flags override every run of the study that uses them (see study.py).
"""
import argparse
import dataclasses
import sys

import torch

import study
import vqvae

RUN_FLAGS = ("config", "resume", "overwrite", "sweep", "seeds", "runs", "summarize")


def config_reference() -> str:
    """Every config key as a Markdown table (key, default, meaning) in Config's groups, made from
    Config as --help is: docs/config.md's key table is this text, and a test keeps it so."""
    rows, group = ["| key | default | meaning |", "|---|---|---|"], None
    for f in dataclasses.fields(vqvae.Config):
        if f.metadata["group"] != group:
            group = f.metadata["group"]
            rows.append(f"| **{group}** | | |")
        default = vqvae.DEFAULTS[f.name]
        default = "empty" if default in ("", None) else ",".join(map(str, default)) if isinstance(default, list) else default
        rows.append(f"| `{f.name}` | `{default}` | {f.metadata['help'].replace('|', '/')} |")
    return "\n".join(rows) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a VQ-VAE (vq_ema, ba_vq or fsq quantizer) on CIFAR-10.",
                                     allow_abbrev=False)
    parser.add_argument("--config", help="YAML file of config keys (e.g. config.yaml, config_mac.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue the run <out_dir>/<name> from its last.pt")
    parser.add_argument("--overwrite", action="store_true", help="replace the results of an existing run of this name "
                        "(with --sweep: redo every run of the study)")
    parser.add_argument("--sweep", metavar="FILE", help="run every run of a sweep file (e.g. sweeps/ba_study.yaml) "
                        "in order, skipping finished runs and resuming interrupted ones; other flags override every run "
                        "whose quantizer uses them")
    parser.add_argument("--seeds", metavar="N", type=int, default=1, help="with --sweep: repeat each run with N seeds "
                        "(seed, seed+1, ...)")
    parser.add_argument("--runs", metavar="NAMES", help="with --sweep: only these runs of the sweep file, as "
                        "comma-separated names (e.g. --runs baseline,ba_iters1 --seeds 3 adds seeds to two runs)")
    parser.add_argument("--summarize", metavar="STUDY_DIR", help="write experiment_results.csv and results.md for a "
                        "study directory (e.g. experiments/ba_study) and exit")
    groups = {}
    for f in dataclasses.fields(vqvae.Config):  # --help lists the keys in Config's groups
        group = groups.get(f.metadata["group"]) or groups.setdefault(
            f.metadata["group"], parser.add_argument_group(f"config: {f.metadata['group']}"))
        help = f"{f.metadata['help']} (default: {vqvae.DEFAULTS[f.name]})"
        if vqvae._field_type(f)[0] is bool:
            group.add_argument(f"--{f.name}", dest=f.name, action="store_const", const=True, help=help)
            group.add_argument(f"--no_{f.name}", dest=f.name, action="store_const", const=False,
                               help=f"turn {f.name} off")
        else:  # values stay strings here; vqvae checks and converts them with the YAML values
            group.add_argument(f"--{f.name}", metavar=f.name.upper(), help=help)
    return parser


def parse_args(argv):
    """argparse's namespace, with unknown options reported as VQVAEError naming the nearest flag."""
    return vqvae.parse_flags(build_parser(), argv, "train.py")


def config_flags(args) -> dict:
    """The config keys given on the command line, as strings for vqvae to check and convert."""
    return {k: v for k, v in vars(args).items() if k not in RUN_FLAGS and v is not None}


def parse(argv):
    """(config, resume, overwrite) of a single run from the command line."""
    args = parse_args(argv)
    overrides = config_flags(args)
    cfg = vqvae.load_config(args.config, overrides)
    if args.resume:  # start from the run's saved config; the YAML file and flags still override it
        saved = vqvae.run_dir_of(cfg) / "config.yaml"
        if saved.is_file():
            cfg = vqvae.load_config(args.config, overrides, base=vqvae.read_yaml(saved))
    return cfg, args.resume, args.overwrite


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
        if args.summarize:
            study.summarize(args.summarize)
        elif args.sweep:
            if args.resume:
                raise vqvae.VQVAEError("--resume is not needed with --sweep: interrupted runs of a study resume by themselves")
            only = [name.strip() for name in args.runs.split(",") if name.strip()] if args.runs else None
            study.run_sweep(args.sweep, args.config, config_flags(args), args.seeds, args.overwrite, only)
        else:
            if args.seeds != 1 or args.runs:
                raise vqvae.VQVAEError("--seeds and --runs go with --sweep; for one run, set --seed")
            cfg, resume, overwrite = parse(argv)
            vqvae.train(cfg, resume=resume, overwrite=overwrite)
    except vqvae.RunStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    except vqvae.VQVAEError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    # Flush denormal floats to zero on the CPU before any thread pool starts (its threads inherit the
    # setting; threads started earlier would not): BA's p(k|e) at small β holds many values under
    # 1e-38, and x86 arithmetic on them is several times slower. Values that small change no result.
    torch.set_flush_denormal(True)
    vqvae.keep_freed_memory()  # freed tensors stay with the process for the next step: no page faults
    sys.exit(main())
