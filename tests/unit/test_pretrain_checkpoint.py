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


# -- resuming on another layout (the conversion itself runs in tests/integration/test_pretrain_program.py) --
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from pretrain.checkpoint import resume_problem  # noqa: E402
from pretrain.reshard import main as reshard_main  # noqa: E402


def _layout(dp=1, tp=1, pp=1, zero=1):
    return {"world_size": dp * tp * pp, "data_parallel": dp, "tensor_parallel": tp, "pipeline_parallel": pp,
            "zero_stage": zero}


CKPT = Path("/ckpt/step_00000100")

RESUME_CASES = {
    # name: (saved layout, universal, this run's layout, None or the words the refusal must contain)
    "same layout": (_layout(dp=2), False, _layout(dp=2), None),
    "zero-0 at another data-parallel size": (_layout(dp=2, zero=0), False, _layout(dp=4, zero=0), None),
    "zero-1 at another data-parallel size": (_layout(dp=2), False, _layout(dp=1),
                                             ["data_parallel=2", "this run has 1", "pretrain.reshard"]),
    "another tensor-parallel size": (_layout(tp=2), False, _layout(tp=1), ["tensor_parallel=2", "pretrain.reshard"]),
    "another zero stage": (_layout(zero=3), False, _layout(zero=1), ["zero_stage=3", "this run has 1"]),
    "another pipeline": (_layout(pp=2), False, _layout(pp=1), ["pipeline_parallel=2", "cannot be resharded"]),
    "universal into another tp x dp": (_layout(tp=2), True, _layout(dp=2, zero=2), None),
    "universal into zero-3": (_layout(tp=2), True, _layout(dp=2, zero=3), ["universal", "zero_stage=3"]),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_problem_names_the_layout_difference(case):
    saved, universal, now, words = RESUME_CASES[case]
    problem = resume_problem(CKPT, {"layout": saved, "universal": universal}, now)
    if words is None:
        assert problem is None
    else:
        assert problem is not None and str(CKPT) in problem and "\n" not in problem
        for word in words:
            assert word in problem, problem


def test_resume_problem_leaves_checkpoints_without_a_layout_to_deepspeed():
    assert resume_problem(CKPT, {}, _layout(dp=8)) is None


def _fake_checkpoint(directory, layout, **meta):
    path = directory / "step_00000007"
    path.mkdir(parents=True)
    (path / "meta.json").write_text(json.dumps({"step": 7, "layout": layout, "files": {}, **meta}))
    return path


@pytest.mark.parametrize("layout, extra, words", [
    (_layout(pp=2), {}, "pipeline_parallel=2"),
    (_layout(zero=0), {}, "zero_stage=0"),
    (_layout(zero=3), {}, "zero_stage=3"),
    (_layout(), {"universal": True}, "already a universal checkpoint"),
])
def test_reshard_refuses_what_it_cannot_convert_in_one_line(tmp_path, capsys, layout, extra, words):
    source = _fake_checkpoint(tmp_path / "in", layout, **extra)
    assert reshard_main([str(source), str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines
    assert not (tmp_path / "out").exists()  # nothing written


def test_reshard_refuses_incomplete_sources_and_existing_outputs(tmp_path, capsys):
    broken = tmp_path / "in" / "step_00000009"
    broken.mkdir(parents=True)
    assert reshard_main([str(broken), str(tmp_path / "out")]) == 2
    assert "no meta.json" in capsys.readouterr().err
    source = _fake_checkpoint(tmp_path / "in", _layout())
    (tmp_path / "out" / source.name).mkdir(parents=True)
    assert reshard_main([str(source), str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_resume_problem_names_changed_model_settings_but_not_the_kernel_choice():
    saved = {"hidden_size": 64, "num_layers": 2, "kernels": "auto"}
    meta = {"layout": _layout(), "model": saved}
    assert resume_problem(CKPT, meta, _layout(), {**saved, "kernels": "reference"}) is None
    problem = resume_problem(CKPT, meta, _layout(), {**saved, "hidden_size": 96})
    assert problem == (f"{CKPT} was saved with model.hidden_size=64 (this run: 96); "
                       "the model section must match the checkpoint's")


def test_commit_records_the_model_section(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=1)
    temporary = _write_save(tmp_path, 5)
    manager._commit(temporary, tmp_path / tag_for_step(5), 5,
                    {"consumed_samples": 40, "config": {"model": {"hidden_size": 64}}}, {"world_size": 1})
    assert json.loads((tmp_path / tag_for_step(5) / "meta.json").read_text())["model"] == {"hidden_size": 64}


def test_a_path_that_is_not_a_checkpoint_is_named_for_what_it_is(tmp_path):
    """export/generate/reshard/--resume given a missing path, a file, a checkpoint.dir or a run dir said
    'no meta.json (the save did not finish)' for all four."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    from pretrain.checkpoint import publish
    publish(_write_save(run_dir / "checkpoints", 5), run_dir / "checkpoints" / tag_for_step(5), {"step": 5})
    (run_dir / "metrics.jsonl").write_text("{}\n")
    assert "does not exist" in checkpoint_problem(tmp_path / "nothere")
    assert "not a directory" in checkpoint_problem(run_dir / "metrics.jsonl")
    for given in (run_dir, run_dir / "checkpoints"):
        problem = checkpoint_problem(given)
        assert "is not a checkpoint but holds some" in problem and str(run_dir / "checkpoints" / "step_00000005") in problem
