"""Print a config's layer table, parameter counts and training FLOPs per token.

Example: python -m cheems_parallel.summary configs/cheems-320m.yaml --seq-length 2048
"""
import argparse
import sys

from .config import ConfigError, load_model_config
from .flops import flops_per_token, layer_parameters, parameter_counts


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def summarize(cfg, seq_length: int) -> str:
    lines = [f"{'layer':>5}  {'mixer':<7} {'ffn':<6} {'params':>10} {'active':>10}"]
    for index, kind in enumerate(cfg.mixers):
        total, active = layer_parameters(cfg, kind)
        lines.append(f"{index:>5}  {'SSD' if kind == 'S' else 'DMAttn':<7} {cfg.ffn:<6} {_human(total):>10} {_human(active):>10}")
    counts = parameter_counts(cfg)
    flops = flops_per_token(cfg, seq_length)
    lines += [
        f"parameters: total {counts['total']:,} ({_human(counts['total'])}), active per token {counts['active']:,} "
        f"({_human(counts['active'])}), embedding {counts['embedding']:,}",
        f"training FLOPs per token at seq {seq_length}: {flops:.4g} ({_human(flops)}FLOP; fwd+bwd)",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cheems_parallel.summary",
        description="Layer table, parameter counts (total and active per token) and training FLOPs per token "
                    "of a Cheems config. Example: python -m cheems_parallel.summary configs/cheems-tiny.yaml")
    parser.add_argument("config", help="YAML config file (its model: and parallel: sections are read)")
    parser.add_argument("--seq-length", type=int, default=2048, help="sequence length for the FLOPs count (default 2048)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set model.num_layers=4 (repeatable)")
    args = parser.parse_args(argv)
    try:
        model_cfg, _ = load_model_config(args.config, args.set)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summarize(model_cfg, args.seq_length))
    return 0


if __name__ == "__main__":
    sys.exit(main())
