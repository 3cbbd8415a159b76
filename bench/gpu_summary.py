"""One short table from the GPU benchmark results in bench/results/ (ratios against each anchor).

Example: python bench/gpu_summary.py
"""
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def load(name):
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def main():
    rows = []
    ssd = load("ssd_h200.json")
    if ssd:
        for problem, by_length in ssd["problems"].items():
            for length, result in sorted(by_length.items(), key=lambda item: int(item[0])):
                rows.append((f"SSD {problem} L={length}", "fwd+bwd x mamba_ssm",
                             result["fwd_bwd"]["speedup_vs_mamba"]))
    dmattn = load("dmattn_h200.json")
    if dmattn:
        for length, result in sorted(dmattn["results"].items(), key=lambda item: int(item[0])):
            methods = result["methods"]
            if "ours_bias" in methods and "cudnn_causal" in methods:
                rows.append((f"DMAttn L={length}", "fwd+bwd x cuDNN causal",
                             methods["ours_bias"]["fwd_bwd_tflops"] / methods["cudnn_causal"]["fwd_bwd_tflops"]))
    pretrain = load("pretrain_h200.json")
    if pretrain:
        for name, run in pretrain.get("runs", {}).items():
            if isinstance(run, dict) and "mfu" in run:
                rows.append((f"pretrain {name}", "MFU", run["mfu"]))
    width = max((len(r[0]) for r in rows), default=10)
    print(f"{'what':<{width}}  {'ratio of':<24} value")
    for what, anchor, value in rows:
        print(f"{what:<{width}}  {anchor:<24} {value:.3f}")


if __name__ == "__main__":
    main()
