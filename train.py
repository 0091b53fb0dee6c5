"""Train a VQ-VAE from the command line.

    python train.py --config config_mac.yaml --quantizer ba_vq --codebook_size 1024

Every key of vqvae.Config is a flag; flags override the YAML file, which overrides the defaults.
"""
import argparse
import dataclasses
import sys

import vqvae

RUN_FLAGS = ("config", "resume", "overwrite")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a VQ-VAE (vq_ema or ba_vq quantizer) on CIFAR-10.",
                                     allow_abbrev=False)
    parser.add_argument("--config", help="YAML file of config keys (e.g. config.yaml, config_mac.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue the run <out_dir>/<name> from its last.pt")
    parser.add_argument("--overwrite", action="store_true", help="replace the results of an existing run of this name")
    for f in dataclasses.fields(vqvae.Config):
        help = f"{f.metadata['help']} (default: {f.default})"
        if vqvae._field_type(f)[0] is bool:
            parser.add_argument(f"--{f.name}", dest=f.name, action="store_const", const=True, help=help)
            parser.add_argument(f"--no_{f.name}", dest=f.name, action="store_const", const=False,
                                help=f"turn {f.name} off")
        else:  # values stay strings here; vqvae checks and converts them with the YAML values
            parser.add_argument(f"--{f.name}", metavar=f.name.upper(), help=help)
    return parser


def parse(argv):
    """(config, resume, overwrite) from the command line; raises VQVAEError on a bad flag."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flags = [o[2:] for o in parser._option_string_actions if o.startswith("--")]
        word = unknown[0]
        name = word[2:].split("=")[0] if word.startswith("--") else word
        hint = vqvae.nearest_name(name, flags).replace("'", "'--", 1) if word.startswith("--") else ""
        raise vqvae.VQVAEError(f"unknown option '{word}'{hint}; see python train.py --help")
    overrides = {k: v for k, v in vars(args).items() if k not in RUN_FLAGS and v is not None}
    cfg = vqvae.load_config(args.config, overrides)
    if args.resume:  # start from the run's saved config; the YAML file and flags still override it
        saved = vqvae.run_dir_of(cfg) / "config.yaml"
        if saved.is_file():
            cfg = vqvae.load_config(args.config, overrides, base=vqvae.read_yaml(saved))
    return cfg, args.resume, args.overwrite


def main(argv=None) -> int:
    try:
        cfg, resume, overwrite = parse(sys.argv[1:] if argv is None else argv)
        vqvae.train(cfg, resume=resume, overwrite=overwrite)
    except vqvae.VQVAEError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
