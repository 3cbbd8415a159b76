"""pretrain.checkpoint: the commit protocol (meta, rename, latest, keep-K) and validity checks.

The DeepSpeed engine side (save_checkpoint / load_checkpoint through the whole program, resume,
SIGTERM, kill -9 mid-save) is exercised in tests/integration/test_pretrain_program.py; here the
files are written directly so every branch of the commit and the validity check runs in milliseconds.
"""
import json
import logging

from pretrain.checkpoint import (CheckpointManager, checkpoint_problem, completed_checkpoints,
                                 newest_valid_checkpoint, tag_for_step)


def _write_save(directory, step, payload=b"weights"):
    temporary = directory / (tag_for_step(step) + ".tmp")
    (temporary / "sub").mkdir(parents=True)
    (temporary / "mp_rank_00_model_states.pt").write_bytes(payload * step)
    (temporary / "sub" / "optim.pt").write_bytes(b"o" * 10)
    return temporary


def test_commit_renames_writes_meta_and_latest_and_keeps_the_last_k(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20, 30):
        temporary = _write_save(tmp_path, step)
        manager._commit(temporary, tmp_path / tag_for_step(step), step, {"consumed_samples": step * 8}, {"world_size": 1})
        assert not temporary.exists()
        assert (tmp_path / "latest").read_text() == tag_for_step(step)
    assert [path.name for path in completed_checkpoints(tmp_path)] == [tag_for_step(30), tag_for_step(20)]
    meta = json.loads((tmp_path / tag_for_step(30) / "meta.json").read_text())
    assert meta["step"] == 30 and meta["consumed_samples"] == 240 and meta["layout"] == {"world_size": 1}
    assert meta["files"] == {"mp_rank_00_model_states.pt": 7 * 30, "sub/optim.pt": 10}
    assert checkpoint_problem(tmp_path / tag_for_step(30)) is None


def test_commit_removes_leftovers_of_killed_saves(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3)
    leftover = _write_save(tmp_path, 40)                    # a save killed before its rename
    temporary = _write_save(tmp_path, 20)
    manager._commit(temporary, tmp_path / tag_for_step(20), 20, {}, {})
    assert not leftover.exists()


def test_problems_of_broken_checkpoints(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=5)
    for step in (1, 2, 3):
        manager._commit(_write_save(tmp_path, step), tmp_path / tag_for_step(step), step, {}, {})
    truncated = tmp_path / tag_for_step(3) / "mp_rank_00_model_states.pt"
    truncated.write_bytes(b"w")
    assert "has 1 bytes, 21 were written" in checkpoint_problem(tmp_path / tag_for_step(3))
    (tmp_path / tag_for_step(2) / "sub" / "optim.pt").unlink()
    assert "sub/optim.pt is missing" in checkpoint_problem(tmp_path / tag_for_step(2))
    (tmp_path / tag_for_step(1) / "meta.json").write_text("{not json")
    assert "unreadable" in checkpoint_problem(tmp_path / tag_for_step(1))
    (tmp_path / "step_00000009").mkdir()                     # no meta.json at all
    assert "no meta.json" in checkpoint_problem(tmp_path / "step_00000009")


def test_newest_valid_checkpoint_skips_broken_ones_with_a_warning(tmp_path, caplog):
    manager = CheckpointManager(tmp_path, keep_last=5)
    for step in (5, 10, 15):
        manager._commit(_write_save(tmp_path, step), tmp_path / tag_for_step(step), step, {}, {})
    (tmp_path / tag_for_step(15) / "mp_rank_00_model_states.pt").unlink()
    _write_save(tmp_path, 20)                                # in progress: never a candidate
    with caplog.at_level(logging.WARNING):
        assert newest_valid_checkpoint(tmp_path) == tmp_path / tag_for_step(10)
    assert "skipping broken checkpoint" in caplog.text and tag_for_step(15) in caplog.text
    assert newest_valid_checkpoint(tmp_path / "missing") is None
