"""BatchSchedule: one answer to "which batch size holds at epoch e", shared by
BatchSizeScheduler, schedules.steps_per_epoch and the benchmarks."""

import numpy as np
import pytest
import tensorflow as tf

import keras_sam
from keras_sam import BatchSchedule
from keras_sam.callbacks import BatchSizeScheduler

DECREASING = {0: 64, 3: 16, 5: 32}  # a max() lookup would say 64 throughout


def _by_hand(schedule, epoch):
    return schedule[max(k for k in schedule if k <= epoch)]


@pytest.mark.parametrize("schedule", [DECREASING, {0: 16, 40: 32, 80: 64}])
def test_dict_holds_each_size_until_the_next_key(schedule):
    got = BatchSchedule(schedule).sizes(90)
    assert got == [_by_hand(schedule, e) for e in range(90)]


def test_int_and_callable():
    assert BatchSchedule(8).sizes(3) == [8, 8, 8]
    assert BatchSchedule(lambda e: 4 * (e + 1)).sizes(3) == [4, 8, 12]
    assert BatchSchedule({np.int64(0): np.int32(16)}).at(np.int64(7)) == 16


def test_everyone_reads_the_same_schedule():
    dataset_fn = lambda b: tf.data.Dataset.range(640).batch(b, drop_remainder=True)  # noqa: E731
    scheduler = BatchSizeScheduler(DECREASING, dataset_fn)
    schedule = BatchSchedule(DECREASING)
    assert [scheduler.batch_size_at(e) for e in range(8)] == schedule.sizes(8)
    expected = [640 // _by_hand(DECREASING, e) for e in range(8)]
    assert schedule.steps_per_epoch(640, 8) == expected
    assert keras_sam.schedules.steps_per_epoch(640, DECREASING, 8) == expected
    assert scheduler.steps_per_epoch(8) == expected


@pytest.mark.parametrize("bad", [{1: 16}, {0: 0}, {-1: 4, 0: 4}, "16", 0, 2.0])
def test_bad_schedules_name_the_argument(bad):
    with pytest.raises(ValueError, match="`batch_schedule`"):
        BatchSchedule(bad, name="batch_schedule")


def test_callable_returning_a_bad_size():
    with pytest.raises(ValueError, match="schedule"):
        BatchSchedule(lambda e: 0).at(0)


def test_an_epoch_without_a_step_is_an_error():
    with pytest.raises(ValueError, match="no step"):
        BatchSchedule({0: 4, 2: 100}).steps_per_epoch(50, 3)
    assert BatchSchedule({0: 4, 2: 100}).steps_per_epoch(50, 3, drop_remainder=False) == [13, 13, 1]
