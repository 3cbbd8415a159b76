"""`make pretrain-smoke`: the whole pipeline on CPU, offline, from a corpus every machine has.

    1. corpus     docstrings and comments of this interpreter's standard library -> smoke/corpus/stdlib.jsonl
    2. tokenizer  sentencepiece BPE (vocab = the tiny model's) -> smoke/tokenizer/stdlib.model
    3. shards     megatron .bin/.idx -> smoke/data/stdlib_text_document
    4. pretrain   python -m pretrain --config configs/cheems-tiny.yaml (ZeRO-1, fp32, CPU): a few hundred
                  steps, evaluation, checkpoints, TensorBoard logs -> smoke/run/
    5. sample     generate() from the saved checkpoint
    6. summary    where everything is; exit 1 if the loss did not clearly fall

Every step is an ordinary command of the project (printed before it runs), so the smoke run is also
the quickstart. Steps 1-3 are skipped when their outputs exist (--rebuild-data forces them).
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import quiet_library_notices

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("pretrain.smoke")


def run_command(command: list[str]) -> None:
    logger.info("$ %s", " ".join(shlex.quote(part) for part in command))
    completed = subprocess.run(command, cwd=REPOSITORY_ROOT)
    if completed.returncode != 0:
        raise SystemExit(f"smoke: command failed with exit code {completed.returncode}")


def build_data(out: Path, corpus_bytes: int, vocab_size: int, rebuild: bool) -> tuple[Path, Path]:
    from data_tools.corpus import write_stdlib_corpus

    corpus = out / "corpus" / "stdlib.jsonl"
    tokenizer_prefix = out / "tokenizer" / "stdlib"
    shard_prefix = out / "data" / "stdlib_text_document"
    for directory in (corpus.parent, tokenizer_prefix.parent, shard_prefix.parent):
        directory.mkdir(parents=True, exist_ok=True)
    if rebuild or not corpus.is_file():
        summary = write_stdlib_corpus(str(corpus), max_bytes=corpus_bytes)
        logger.info("corpus: %d documents, %.1f MB from the standard library -> %s", summary["documents"],
                    summary["bytes"] / 1e6, corpus)
    python = sys.executable
    if rebuild or not Path(f"{tokenizer_prefix}.model").is_file():
        run_command([python, "-m", "data_tools.train_tokenizer", "--input", str(corpus), "--vocab-size",
                     str(vocab_size), "--model-prefix", str(tokenizer_prefix)])
    if rebuild or not Path(f"{shard_prefix}.idx").is_file():
        run_command([python, "-m", "data_tools.preprocess", "--input", str(corpus), "--output-prefix",
                     str(shard_prefix), "--tokenizer", f"{tokenizer_prefix}.model", "--workers", "2",
                     "--append-eod", "--no-progress"])
    return Path(f"{tokenizer_prefix}.model"), shard_prefix


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    train, evaluation = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        (evaluation if record["kind"] == "eval" else train).append(record)
    return train, evaluation


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.smoke",
        description="Build a tokenizer and shards from the standard library's docstrings, pretrain cheems-tiny on "
                    "CPU, evaluate, checkpoint, and sample text: the offline end-to-end demo.",
        epilog="example: python -m pretrain.smoke --steps 200   (or: make pretrain-smoke)")
    parser.add_argument("--out", default="smoke", help="output directory (relative to the repository root)")
    parser.add_argument("--config", default="configs/cheems-tiny.yaml", help="model/trainer config to train")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the config's train.steps)")
    parser.add_argument("--corpus-mb", type=float, default=4.0, help="megabytes of standard-library text to use")
    parser.add_argument("--rebuild-data", action="store_true", help="rebuild corpus, tokenizer and shards")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override passed to python -m pretrain (repeatable)")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    quiet_library_notices()   # sampling imports megatron-core in this process: keep its notices out of the summary
    started = time.perf_counter()

    from cheems_parallel.config import read_yaml
    out = (REPOSITORY_ROOT / arguments.out).resolve()
    vocab_size = int(read_yaml(REPOSITORY_ROOT / arguments.config).get("model", {}).get("vocab_size", 8192))
    tokenizer_model, shard_prefix = build_data(out, int(arguments.corpus_mb * 1e6), vocab_size, arguments.rebuild_data)

    run_dir = out / "run"
    if run_dir.exists():  # a fresh run each time: old checkpoints would otherwise mix with the new ones
        shutil.rmtree(run_dir)
    overrides = [f"data.blend={shard_prefix}", f"data.tokenizer_model={tokenizer_model}",
                 f"logging.run_dir={run_dir}", "checkpoint.dir=null", "checkpoint.resume=null"]
    if arguments.steps is not None:
        overrides.append(f"train.steps={arguments.steps}")
    overrides += arguments.overrides
    command = [sys.executable, "-m", "pretrain", "--config", arguments.config]
    for override in overrides:
        command += ["--set", override]
    run_command(command)

    train, evaluation = read_metrics(run_dir / "metrics.jsonl")
    checkpoint = (run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip())

    from data_tools.tokenizer import load_tokenizer
    from .generate import load_model_from_checkpoint, sample
    model, _ = load_model_from_checkpoint(checkpoint)
    tokenizer = load_tokenizer(str(tokenizer_model))
    prompts = ["Return the number of", "This module provides", "If the file"]
    samples = sample(model, tokenizer, prompts, max_new_tokens=32, temperature=0.7, top_k=40, seed=0)

    first, last = train[0], train[-1]
    falling = last["train/loss"] < first["train/loss"] - 1.0
    print("\n==== pretrain smoke: summary ====")
    print(f"loss       {first['train/loss']:.3f} (step {first['step']}) -> {last['train/loss']:.3f} "
          f"(step {last['step']})  {'falling' if falling else 'NOT FALLING'}")
    if evaluation:
        print(f"eval       loss {evaluation[-1]['eval/loss']:.3f}, perplexity {evaluation[-1]['eval/perplexity']:.1f} "
              f"(step {evaluation[-1]['step']})")
    print(f"speed      {last['perf/tokens_per_second']:,.0f} tokens/s on CPU")
    print(f"corpus     {out / 'corpus' / 'stdlib.jsonl'}")
    print(f"tokenizer  {tokenizer_model}")
    print(f"shards     {shard_prefix}.bin / .idx")
    print(f"metrics    {run_dir / 'metrics.jsonl'}")
    print(f"tensorboard --logdir {run_dir / 'tensorboard'}")
    print(f"checkpoint {checkpoint}")
    print("samples (temperature 0.7, top-k 40):")
    for prompt, text in zip(prompts, samples):
        print(f"  {prompt!r} -> {text!r}")
    print(f"resume     python -m pretrain --config {arguments.config} "
          + " ".join(f"--set {override}" for override in overrides[:3]) + " --resume auto")
    print(f"done in {time.perf_counter() - started:.0f} s")
    if not falling:
        print("error: the training loss did not fall by at least 1.0 nats", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
