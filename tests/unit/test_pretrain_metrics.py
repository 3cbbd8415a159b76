"""pretrain.metrics: metrics.jsonl lines, resume truncation, TensorBoard events, the console line."""
import json
import math

from pretrain.metrics import (MetricsLogger, format_duration, peak_flops_per_device, train_console_line,
                              truncate_jsonl_after)


def test_jsonl_and_tensorboard_are_written(tmp_path):
    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=True, resumed_step=None)
    logger.write(1, {"train/loss": 5.0, "perf/mfu": None})
    logger.write(2, {"train/loss": float("nan")})
    logger.write(2, {"eval/loss": 4.5}, kind="eval")
    logger.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["kind"]) for r in records] == [(1, "train"), (2, "train"), (2, "eval")]
    assert records[0]["train/loss"] == 5.0 and records[0]["perf/mfu"] is None
    assert math.isnan(records[1]["train/loss"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [event.value for event in events.Scalars("train/loss")] == [5.0]   # NaN is not plotted
    assert [event.value for event in events.Scalars("eval/loss")] == [4.5]


def test_resume_keeps_lines_up_to_the_checkpoint_and_drops_torn_ones(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": step, "kind": "train"}) + "\n" for step in range(1, 6)) + '{"step": 6, "ki')
    truncate_jsonl_after(path, 3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=False, resumed_step=3)
    logger.write(4, {"train/loss": 1.0})
    logger.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "run", enabled=False, tensorboard=True, resumed_step=None)
    logger.write(1, {"train/loss": 1.0})
    logger.close()
    assert not (tmp_path / "run").exists()


def test_console_line_has_step_loss_throughput_mfu_and_eta():
    values = {"train/loss": 3.25, "train/lr": 1e-3, "train/grad_norm": 0.5, "perf/tokens_per_second": 12345.0,
              "perf/mfu": 0.4123, "perf/peak_memory_gib": 1.5, "train/skipped_steps": 0}
    line = train_console_line(100, 400, values, seconds_per_step=2.0)
    for part in ("step 100/400", "loss 3.2500", "12,345 tok/s", "MFU 41.2%", "ETA 10m00s"):
        assert part in line, line
    assert "MFU n/a" in train_console_line(1, 2, dict(values, **{"perf/mfu": None}), 1.0)


def test_durations_and_peaks():
    assert format_duration(3725) == "1h02m" and format_duration(59) == "0m59s"
    assert format_duration(float("inf")) == "?"
    assert peak_flops_per_device(123.0, "fp32") == 123.0
