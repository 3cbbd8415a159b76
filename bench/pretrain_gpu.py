"""Pretraining throughput on one GPU: cheems-320m and llama-320m through the whole `python -m pretrain`.

For each model: ~50 steps in bf16 at sequence length 2048 (ZeRO-1, one GPU), logged every step;
the first `--warmup` steps are dropped and the rest summarised by their median: tokens/s, model
TFLOP/s (tokens/s x training FLOPs per token from cheems_parallel.flops), MFU against the datasheet
bf16 peak, and peak allocated memory. Two anchors, measured in the same run on the same GPU:
  * a large bf16 matmul (torch.mm 8192^3), the rate no model step can beat; each model's TFLOP/s is
    given as a fraction of it;
  * the same model's bare forward + backward (bf16 weights, no DeepSpeed, optimizer or data loader) at
    the same micro-batch; trainer tokens/s over it is what the whole program adds on top of the math.
and the Cheems/Llama throughput ratio.

    python bench/pretrain_gpu.py --data-prefix smoke/gpu_data/data/stdlib_text_document \
        --tokenizer smoke/gpu_data/tokenizer/stdlib.model

Writes bench/results/pretrain_h200.json (or --out). bench/gpu_pretrain.sh is the one-call wrapper for
the lent H200 (installs the carried wheels, then runs this).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]


def matmul_anchor_tflops(size: int = 8192, repeats: int = 20) -> float:
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        torch.mm(a, b)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        torch.mm(a, b)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * size**3 / statistics.median(times) / 1e12


def bare_model_step(name: str, micro_batch: int, seq_length: int, device: str, repeats: int = 10) -> dict:
    """Second anchor: the same model's forward + backward alone (bf16 weights, no DeepSpeed, no optimizer,
    no data loader), median seconds per micro-batch. Trainer tokens/s over this = what the engine,
    optimizer, data and logging cost on top of the model math."""
    import torch.distributed as dist
    from cheems_parallel.config import load_model_config
    from cheems_parallel.model import CheemsForCausalLM
    from cheems_parallel.parallel import initialize_parallel

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    model_config, parallel_config = load_model_config(REPOSITORY_ROOT / "configs" / f"{name}.yaml")
    initialize_parallel(parallel_config)
    torch.manual_seed(0)
    model = CheemsForCausalLM(model_config, parallel_config).to(device=device, dtype=torch.bfloat16)
    tokens = torch.randint(0, model_config.vocab_size, (micro_batch, seq_length + 1), device=device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    times = []
    for index in range(repeats + 3):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        model(inputs, labels=labels).loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        if index >= 3:
            times.append(time.perf_counter() - started)
        model.zero_grad(set_to_none=True)
    seconds = statistics.median(times)
    return {"seconds_per_micro_batch": seconds, "tokens_per_second": micro_batch * seq_length / seconds}


def run_model(name: str, arguments, micro_batch: int, activation_checkpointing: bool) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"bench_{name}_"))
    overrides = [
        f"data.blend={arguments.data_prefix}", f"data.tokenizer_model={arguments.tokenizer}",
        f"data.seq_length={arguments.seq_length}", "data.num_workers=2",
        f"train.steps={arguments.steps}", f"train.micro_batch_size={micro_batch}",
        f"train.global_batch_size={micro_batch}", "train.precision=bf16", "train.zero_stage=1",
        f"train.activation_checkpointing={'true' if activation_checkpointing else 'false'}",
        f"schedule.warmup_steps={arguments.steps}", "eval.interval=0", "eval.iterations=0", "checkpoint.interval=0",
        "checkpoint.save_at_exit=false", "logging.interval=1", "logging.tensorboard=false",
        f"logging.run_dir={run_dir}", f"model.kernels={arguments.kernels}",
    ] + arguments.extra
    command = [sys.executable, "-m", "pretrain", "--config", f"configs/{name}.yaml"]
    for override in overrides:
        command += ["--set", override]
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=REPOSITORY_ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    log_path = Path(arguments.log_dir) / f"{name}_mb{micro_batch}.log" if arguments.log_dir else None
    if log_path:
        log_path.write_text(completed.stdout + completed.stderr)
    if completed.returncode != 0:
        out_of_memory = "OutOfMemoryError" in completed.stderr or "out of memory" in completed.stderr
        return {"model": name, "ok": False, "out_of_memory": out_of_memory,
                "error": completed.stderr.strip().splitlines()[-1] if completed.stderr.strip() else "?"}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [record for record in records if record["kind"] == "train"]
    steady = train[arguments.warmup:]
    tokens_per_second = statistics.median(record["perf/tokens_per_second"] for record in steady)
    # The mean over the steady steps (tokens / seconds) keeps the occasional slow step the median hides.
    mean_tokens_per_second = (sum(record["perf/tokens_per_second"] * record["perf/seconds_per_step"] for record in steady)
                              / sum(record["perf/seconds_per_step"] for record in steady))
    mfu_values = [record["perf/mfu"] for record in steady if record["perf/mfu"] is not None]
    model_line = [line for line in completed.stderr.splitlines() if " model: " in line]
    return {
        "model": name, "ok": True, "micro_batch_size": micro_batch, "seq_length": arguments.seq_length,
        "activation_checkpointing": activation_checkpointing, "steps": len(train), "steady_steps": len(steady),
        "tokens_per_second": tokens_per_second, "mean_tokens_per_second": mean_tokens_per_second,
        "overrides": arguments.extra,
        "mfu": statistics.median(mfu_values) if mfu_values else None,
        "peak_memory_gib": max(record["perf/peak_memory_gib"] for record in train),
        "first_loss": train[0]["train/loss"], "last_loss": train[-1]["train/loss"],
        "wall_seconds": wall, "kernel_path": model_line[-1].rsplit("|", 1)[-1].strip() if model_line else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="example: python bench/pretrain_gpu.py "
                                            "--data-prefix smoke/gpu_data/data/stdlib_text_document "
                                            "--tokenizer smoke/gpu_data/tokenizer/stdlib.model")
    parser.add_argument("--models", nargs="+", default=["cheems-320m", "llama-320m"], help="configs/<name>.yaml to run")
    parser.add_argument("--data-prefix", required=True, help="token shard prefix (vocab <= 32768)")
    parser.add_argument("--tokenizer", required=True, help="sentencepiece model the shard was made with")
    parser.add_argument("--steps", type=int, default=50, help="training steps per model")
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out of the medians")
    parser.add_argument("--seq-length", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per step (halved on out-of-memory)")
    parser.add_argument("--kernels", default="auto", choices=["auto", "reference"],
                        help="model.kernels: Triton kernels when importable (auto) or the PyTorch references")
    parser.add_argument("--bare-model", default=None, help=argparse.SUPPRESS)  # internal: one bare-model timing
    parser.add_argument("--out", default="bench/results/pretrain_h200.json", help="JSON results file")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for every run, after the benchmark's own (repeatable)")
    parser.add_argument("--log-dir", default=os.environ.get("OUT"), help="where to keep each run's full log")
    arguments = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: needs a CUDA GPU", file=sys.stderr)
        return 2

    if arguments.bare_model:
        print(json.dumps(bare_model_step(arguments.bare_model, arguments.micro_batch, arguments.seq_length, "cuda")))
        return 0
    anchor = matmul_anchor_tflops()
    from cheems_parallel.config import load_model_config
    from cheems_parallel.flops import flops_per_token
    results = []
    for name in arguments.models:
        micro, checkpointing = arguments.micro_batch, False
        while True:
            result = run_model(name, arguments, micro, checkpointing)
            if result["ok"] or not result.get("out_of_memory") or micro == 1:
                break
            micro, checkpointing = max(1, micro // 2), True
        if result["ok"]:
            model_config, _ = load_model_config(REPOSITORY_ROOT / "configs" / f"{name}.yaml")
            result["flops_per_token"] = flops_per_token(model_config, arguments.seq_length)
            result["model_tflops"] = result["tokens_per_second"] * result["flops_per_token"] / 1e12
            result["fraction_of_matmul_anchor"] = result["model_tflops"] / anchor
            # Bare forward+backward of the same model and micro-batch, in a fresh process.
            bare = subprocess.run([sys.executable, __file__, "--bare-model", name, "--micro-batch",
                                   str(result["micro_batch_size"]), "--seq-length", str(arguments.seq_length),
                                   "--data-prefix", "-", "--tokenizer", "-"],
                                  cwd=REPOSITORY_ROOT, capture_output=True, text=True)
            if bare.returncode == 0:
                result["bare_model_tokens_per_second"] = json.loads(bare.stdout.strip().splitlines()[-1])["tokens_per_second"]
                result["trainer_over_bare_model"] = result["tokens_per_second"] / result["bare_model_tokens_per_second"]
            else:
                result["bare_model_error"] = (bare.stderr.strip().splitlines() or ["?"])[-1]
        results.append(result)

    device = torch.cuda.get_device_name()
    summary = {"device": device, "torch": torch.__version__, "anchor_bf16_matmul_tflops": anchor,
               "results": results}
    ok = {result["model"]: result for result in results if result["ok"]}
    if "cheems-320m" in ok and "llama-320m" in ok:
        summary["cheems_over_llama_tokens_per_second"] = ok["cheems-320m"]["tokens_per_second"] / ok["llama-320m"]["tokens_per_second"]
    out = REPOSITORY_ROOT / arguments.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    if arguments.log_dir:
        (Path(arguments.log_dir) / Path(arguments.out).name).write_text(json.dumps(summary, indent=1))

    print(f"\n{device} | bf16 | seq {arguments.seq_length} | {arguments.steps} steps (median of the last "
          f"{arguments.steps - arguments.warmup}) | anchor: bf16 matmul 8192^3 = {anchor:.0f} TFLOP/s")
    print(f"{'model':<14}{'ops':>10}{'micro':>6}{'ckpt':>6}{'tokens/s':>12}{'mean tok/s':>12}{'TFLOP/s':>10}{'MFU':>8}{'x anchor':>10}"
          f"{'bare f+b tok/s':>16}{'trainer/bare':>14}{'peak GiB':>10}{'loss':>16}")
    for result in results:
        if not result["ok"]:
            print(f"{result['model']:<14} FAILED: {result['error']}")
            continue
        mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "n/a"
        ops = "triton" if "triton" in (result["kernel_path"] or "") else "reference"
        print(f"{result['model']:<14}{ops:>10}{result['micro_batch_size']:>6}{'on' if result['activation_checkpointing'] else 'off':>6}"
              f"{result['tokens_per_second']:>12,.0f}{result['mean_tokens_per_second']:>12,.0f}"
              f"{result['model_tflops']:>10.1f}{mfu:>8}"
              f"{result['fraction_of_matmul_anchor']:>10.3f}"
              f"{result.get('bare_model_tokens_per_second', float('nan')):>16,.0f}"
              f"{result.get('trainer_over_bare_model', float('nan')):>14.2f}{result['peak_memory_gib']:>10.1f}"
              f"{result['first_loss']:>8.2f}->{result['last_loss']:<6.2f}")
    if "cheems_over_llama_tokens_per_second" in summary:
        print(f"cheems-320m / llama-320m tokens/s: {summary['cheems_over_llama_tokens_per_second']:.2f}")
    return 0 if all(result["ok"] for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
