"""Atomic DeepSpeed checkpoints: keep the last K, resume from the newest valid one.

Layout of `checkpoint.dir`:
    step_00000200/            one completed checkpoint (a DeepSpeed tag directory)
        mp_rank_00_model_states.pt, *optim_states.pt ...   written by engine.save_checkpoint
        rng_rank00000.pt ...  python / numpy / torch / cuda RNG states of every rank
        meta.json             written last inside the folder: step, consumed samples, layout, and
                              every file's size (a checkpoint whose files disagree is "broken")
    step_00000300.tmp/        a save in progress (or one killed mid-way): never read, removed later
    latest                    the newest completed tag (DeepSpeed's own convention), replaced last

A save: every rank writes into `<tag>.tmp` through the engine (model, ZeRO optimizer partitions,
LR scheduler, client state = data position) and its RNG file; after a barrier rank 0 writes
meta.json, fsyncs, renames `<tag>.tmp` -> `<tag>`, fsyncs the directory, then replaces `latest`
(write + rename) and deletes checkpoints beyond the last K. Killing any process at any moment leaves
either the previous checkpoint set or the new one, never a half-written folder under a final name.
The directory must be on a filesystem all ranks share (as DeepSpeed's own checkpoints assume).
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

# torch is imported where it is used: the command lines that import this module for CheckpointError and the
# folder checks (python -m pretrain's config errors and --check, pretrain.reshard's refusals) then answer
# without its ~3 s import.
if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

TAG_PATTERN = re.compile(r"^step_(\d{8,})$")
META_FILE = "meta.json"


class CheckpointError(Exception):
    """A checkpoint a user pointed at cannot be used; one-line message."""


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_path(path: Path) -> None:
    # Directories need an fsync too, or a rename may not survive a power loss.
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _fsync_path(path.parent)


# -- resuming on another layout ------------------------------------------------------------------
RESHARD_HINT = "convert it once with `python -m pretrain.reshard {path} NEW_DIR` and resume from NEW_DIR/{tag}"


# Model settings that do not change the parameters (how the layers compute, not what they hold).
MODEL_KEYS_FREE_ON_RESUME = ("kernels",)


def resume_problem(path: Path, meta: dict, layout: dict, model: dict | None = None) -> str | None:
    """None when the checkpoint at `path` (its meta.json) can be loaded by a run with `layout` and the
    `model` config section, else why not.

    A DeepSpeed checkpoint holds one file per tensor-parallel rank and, under ZeRO-1/2/3, one optimizer
    partition per data-parallel rank, so it only loads into the layout that wrote it (ZeRO-0 keeps the
    whole optimizer state per model-parallel rank: any data-parallel size). A universal checkpoint
    (pretrain.reshard) keeps every parameter whole and loads into any tensor x data-parallel layout.
    """
    saved_model = meta.get("model")
    if saved_model and model:
        changed = [key for key in sorted(set(saved_model) | set(model)) if key not in MODEL_KEYS_FREE_ON_RESUME
                   and saved_model.get(key) != model.get(key)]
        if changed:
            shown = ", ".join(f"model.{key}={saved_model.get(key)!r} (this run: {model.get(key)!r})"
                              for key in changed[:3])
            return (f"{path} was saved with {shown}{' and more' if len(changed) > 3 else ''}; "
                    "the model section must match the checkpoint's")
    saved = meta.get("layout")
    if not saved:
        return None  # written before layouts were recorded: let DeepSpeed decide
    if layout["pipeline_parallel"] != saved.get("pipeline_parallel", 1):
        return (f"{path} was saved with pipeline_parallel={saved.get('pipeline_parallel')}, this run has "
                f"{layout['pipeline_parallel']}: pipeline stages cannot be resharded")
    if meta.get("universal"):  # written from a pipeline_parallel=1 run, so the check above covers pipelines
        if layout["zero_stage"] not in (1, 2):
            return (f"{path} is a universal checkpoint, which loads into ZeRO-1/2; "
                    f"this run has zero_stage={layout['zero_stage']}")
        return None
    hint = RESHARD_HINT.format(path=path, tag=path.name)
    if saved.get("zero_stage") != layout["zero_stage"]:
        return (f"{path} was saved with zero_stage={saved.get('zero_stage')}, this run has {layout['zero_stage']}"
                + ("; " + hint if layout["zero_stage"] in (1, 2) and saved.get("zero_stage") in (1, 2) else ""))
    if saved.get("tensor_parallel") != layout["tensor_parallel"]:
        return (f"{path} was saved with tensor_parallel={saved.get('tensor_parallel')}, this run has "
                f"{layout['tensor_parallel']}; " + hint)
    if layout["zero_stage"] > 0 and saved.get("data_parallel") != layout["data_parallel"]:
        return (f"{path} was saved with data_parallel={saved.get('data_parallel')} (ZeRO-{layout['zero_stage']} "
                f"partitions), this run has {layout['data_parallel']}; " + hint)
    return None


def universal_checkpoint_info(model: torch.nn.Module) -> dict:
    """How each parameter is split over tensor-parallel ranks, saved with every checkpoint so DeepSpeed's
    universal converter (pretrain.reshard) can join the slices: row-parallel weights along dim 1,
    replicated ones taken whole (the converter checks they are equal on every rank, so a sharded parameter
    missing its TP attributes fails the conversion instead of being merged wrong), the rest along dim 0."""
    from deepspeed.checkpoint import constants

    row_parallel, replicated = [], []
    for name, parameter in model.named_parameters():
        exact = re.escape(name) + "$"
        if not getattr(parameter, "tensor_model_parallel", False):
            replicated.append(exact)
        elif getattr(parameter, "partition_dim", 0) == 1:
            row_parallel.append(exact)
    return {constants.UNIVERSAL_CHECKPOINT_VERSION_KEY: constants.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
            constants.TP_REPLICATED_PARAMETER_PATTERNS: replicated,
            constants.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: row_parallel}


def publish(temporary: Path, final: Path, meta: dict) -> None:
    """Complete a checkpoint written into `temporary`: fsync its files, write meta.json (`meta` plus the save
    time and every file's size), rename it to `final` and point `latest` at it. `final` must not exist."""
    files = {}
    for file in sorted(temporary.rglob("*")):
        if file.is_file():
            _fsync_path(file)
            files[str(file.relative_to(temporary))] = file.stat().st_size
    meta = {**meta, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": files}
    _write_atomically(temporary / META_FILE, json.dumps(meta, indent=1))
    os.replace(temporary, final)
    _fsync_path(final.parent)
    _write_atomically(final.parent / "latest", final.name)


def rng_state() -> dict:
    import torch

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def checkpoint_problem(path: Path) -> str | None:
    """None when `path` is a complete checkpoint, else why not (one line)."""
    meta_path = path / META_FILE
    if not path.is_dir():
        return f"{path}: {'not a directory' if path.exists() else 'does not exist'}; a checkpoint is a step_NNNNNNNN folder"
    if not meta_path.is_file():
        for holder in (path, path / "checkpoints"):   # a checkpoint.dir or a run dir given instead of a checkpoint
            inside = completed_checkpoints(holder)
            if inside:
                return (f"{path} is not a checkpoint but holds some: name one, e.g. {inside[0]} "
                        f"(or resume with 'auto' and checkpoint.dir={holder})")
        return f"{path}: no {META_FILE} (not a checkpoint, or its save did not finish)"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        files = meta["files"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
        return f"{meta_path}: unreadable"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{path}: {name} is missing"
        if file.stat().st_size != size:
            return f"{path}: {name} has {file.stat().st_size} bytes, {size} were written"
    return None


def read_meta(path: Path) -> dict:
    return json.loads((path / META_FILE).read_text(encoding="utf-8"))


def completed_checkpoints(directory: Path) -> list[Path]:
    """Completed-looking checkpoint folders, newest step first (validity is checked separately)."""
    if not directory.is_dir():
        return []
    found = [child for child in directory.iterdir() if child.is_dir() and TAG_PATTERN.match(child.name)]
    return sorted(found, key=lambda child: int(TAG_PATTERN.match(child.name).group(1)), reverse=True)


def newest_valid_checkpoint(directory: Path) -> Path | None:
    for candidate in completed_checkpoints(directory):
        problem = checkpoint_problem(candidate)
        if problem is None:
            return candidate
        logger.warning("skipping broken checkpoint: %s", problem)
    return None


class CheckpointManager:
    def __init__(self, directory: str | Path, keep_last: int, pause_in_save_seconds: float = 0.0):
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.pause_in_save_seconds = pause_in_save_seconds

    # -- saving ---------------------------------------------------------------------------------
    def save(self, engine, step: int, client_state: dict, layout: dict) -> Path:
        import torch
        import torch.distributed as dist

        tag = tag_for_step(step)
        final = self.directory / tag
        temporary = self.directory / (tag + ".tmp")
        rank = dist.get_rank()
        if rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            if temporary.exists():  # a save killed earlier at this very step
                shutil.rmtree(temporary)
        dist.barrier()
        engine.save_checkpoint(str(self.directory), tag=temporary.name, client_state=client_state,
                               save_latest=False)
        torch.save(rng_state(), temporary / f"rng_rank{rank:05d}.pt")
        dist.barrier()
        if rank == 0:
            self._commit(temporary, final, step, client_state, layout)
        dist.barrier()
        return final

    def _commit(self, temporary: Path, final: Path, step: int, client_state: dict, layout: dict) -> None:
        if self.pause_in_save_seconds:
            logger.warning("debug.pause_in_save_seconds: pausing %.1f s inside the save of %s",
                           self.pause_in_save_seconds, final.name)
            time.sleep(self.pause_in_save_seconds)
        if final.exists():  # the same step saved again (e.g. at exit right after an interval save)
            shutil.rmtree(final)
        publish(temporary, final, {"step": step, "consumed_samples": client_state.get("consumed_samples"),
                                   "layout": layout, "model": (client_state.get("config") or {}).get("model")})
        self._prune()

    def _prune(self) -> None:
        for old in completed_checkpoints(self.directory)[self.keep_last:]:
            shutil.rmtree(old, ignore_errors=True)
        for leftover in self.directory.glob("step_*.tmp"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)

    # -- loading --------------------------------------------------------------------------------
    def resolve(self, resume: str | None) -> Path | None:
        """The checkpoint folder to resume from ('auto' = newest valid), agreed by every rank."""
        if resume is None:
            return None
        import torch.distributed as dist

        choice = [None]
        if dist.get_rank() == 0:
            if resume == "auto":
                found = newest_valid_checkpoint(self.directory)
                if found is None:
                    logger.info("resume auto: no checkpoint in %s, starting from scratch", self.directory)
                choice[0] = str(found) if found else None
            else:
                path = Path(resume)
                problem = checkpoint_problem(path)
                choice[0] = f"error:{problem}" if problem else str(path)
        dist.broadcast_object_list(choice, src=0)
        if choice[0] is not None and choice[0].startswith("error:"):
            raise CheckpointError(f"checkpoint.resume: {choice[0][len('error:'):]}")
        return Path(choice[0]) if choice[0] else None

    def load(self, engine, path: Path, layout: dict) -> dict:
        """Restore engine (model, optimizer, scheduler) and RNG; return the client state."""
        import torch
        import torch.distributed as dist

        meta = read_meta(path)
        load_path, client_state = engine.load_checkpoint(str(path.parent), tag=path.name,
                                                         load_optimizer_states=True,
                                                         load_lr_scheduler_states=True)
        if load_path is None:
            raise CheckpointError(f"{path}: DeepSpeed could not load this checkpoint")
        rng_file = path / f"rng_rank{dist.get_rank():05d}.pt"
        if meta.get("layout") == layout and rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            logger.warning("%s was saved with layout %s, now %s: RNG states not restored",
                           path, meta.get("layout"), layout)
        return client_state or {}
