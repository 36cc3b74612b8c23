"""The phase clock splits an engine's train call with the loop's own timestamps."""

from __future__ import annotations

from datetime import datetime, timezone

from workers.job_phases import PhaseClock


def test_train_call_is_split_into_start_up_loop_and_teardown() -> None:
    clock = PhaseClock(submitted_at=datetime.fromtimestamp(100.0, timezone.utc),
                       started_at=102.0)
    clock._train_call = (105.0, 150.0)  # as train_call() would record it
    clock.add("preparing", 102.0, 105.0)
    clock.add("training", 105.0, 150.0)
    clock.split_training({"loop_started_at": 120.0, "loop_finished_at": 140.0})
    clock.add("evaluation", 150.0, 160.0)
    clock.add("upload", 160.0, 161.0)
    clock.add("promote", 161.0, 162.0)
    assert clock.seconds() == {"queue_wait": 2.0, "preparing": 18.0, "training": 20.0,
                               "teardown": 10.0, "evaluation": 10.0, "upload": 1.0,
                               "promote": 1.0}
    record = clock.record(live=True)
    assert record["total_seconds"] == 62.0 and record["live"] is True
    assert record["outside_training_seconds"] == 42.0
    assert record["outside_training_share"] == round(42 / 62, 4)


def test_timestamps_outside_the_call_are_clamped_and_missing_ones_ignored() -> None:
    clock = PhaseClock(submitted_at=datetime.fromtimestamp(0.0, timezone.utc), started_at=1.0)
    clock._train_call = (2.0, 10.0)
    clock.add("training", 2.0, 10.0)
    clock.split_training({"steps": 3})  # no timestamps: unchanged
    assert clock.seconds()["training"] == 8.0 and "teardown" not in clock.seconds()
    clock.split_training({"loop_started_at": 0.5, "loop_finished_at": 99.0})
    assert clock.seconds()["training"] == 8.0 and clock.seconds()["teardown"] == 0.0
