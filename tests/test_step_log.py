"""propetl.run.step_log: every N steps a W&B record (loss, each group's learning rate) and, off a terminal,
one log line with loss, step rate and ETA."""
from __future__ import annotations

import io
import logging
from contextlib import contextmanager

import pytest

from propetl.run.step_log import (
    EvalPlan,
    StepLog,
    bar_shown,
    duration,
    learning_rates,
    progress_line,
)

GROUPS = [{"name": "weights", "lr": 1e-3}, {"name": "weights_no_decay", "lr": 1e-3}, {"name": "masks", "lr": 3e-2},
          {"name": "head", "lr": 2e-3}, {"name": "head_no_decay", "lr": 2e-3}]


@pytest.mark.parametrize("method,weights", [("propetl", "prototype"), ("petl", "petl"), ("finetune", "backbone")])
def test_learning_rates_are_named_by_what_each_group_trains(method, weights):
    assert learning_rates(GROUPS, method) == {f"lr/{weights}": 1e-3, "lr/mask": 3e-2, "lr/head": 2e-3}


def test_progress_line_and_durations():
    assert progress_line(120, 2000, 0.53214, 4.1) == "step 120/2000 loss 0.5321 4.1 it/s eta 7m39s"
    assert [duration(s) for s in (12, 458, 7500)] == ["12s", "7m38s", "2h05m"]
    assert progress_line(5, 10, 1.0, 0.0).endswith("eta ?")


@contextmanager
def propetl_log_lines():
    """The propetl logger's INFO lines, written to the StringIO yielded."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("propetl")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def test_off_a_terminal_a_line_every_n_steps_into_the_log():
    records, now = [], [0.0]
    with propetl_log_lines() as stream:
        log = StepLog(every=4, total_steps=12, method="propetl", record_fn=records.append,
                      lines=not bar_shown(True, stream), clock=lambda: now[0])
        losses = []
        for step in range(1, 13):
            now[0] += 0.5                                          # 2 steps a second
            losses.append(float(step))
            log.after_step(step, losses, GROUPS)
    assert stream.getvalue().splitlines() == ["step 4/12 loss 2.5000 2.0 it/s eta 4s",
                                              "step 8/12 loss 6.5000 2.0 it/s eta 2s",
                                              "step 12/12 loss 10.5000 2.0 it/s eta 0s"]
    assert [r["step"] for r in records] == [4, 8, 12] and records[0]["train/loss"] == 2.5
    assert records[0]["lr/mask"] == 3e-2


def test_on_a_terminal_the_bar_and_no_lines():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert bar_shown(True, Terminal()) and not bar_shown(False, Terminal()) and not bar_shown(True, io.StringIO())


def test_the_eta_is_the_whole_runs_evaluation_included():
    """Every selection pass still to come (one an epoch) and the test pass count: estimated as forward passes until
    a selection pass is timed, then at its measured speed."""
    plan = EvalPlan(epochs=3, batch_size=4, selection_rows=40, test_rows=80)
    now = [0.0]
    with propetl_log_lines() as stream:
        log = StepLog(every=4, total_steps=12, method="propetl", record_fn=lambda record: None, lines=True,
                      clock=lambda: now[0], evaluation=plan)
        losses = []
        for step in range(1, 13):
            now[0] += 0.5                                          # 2 steps a second: 8 rows a second
            losses.append(1.0)
            epochs_done = (step - 1) // 4
            if step == 5:
                plan.pass_seconds = 10.0                           # the first selection pass took 10 s
            log.after_step(step, losses, GROUPS, epochs_done)
    # step 4: 4 s of steps + 3 selection passes of 40 / (3 * 8) s + the test pass, twice their rows: 12.3 s
    # step 8: 2 s + 2 passes of 10 s + the test pass (80 rows at 4 rows/s): 42 s;  step 12: 1 pass + test: 30 s
    assert [line.rsplit("eta ", 1)[1] for line in stream.getvalue().splitlines()] == ["12s", "42s", "30s"]
    assert log.eta == "30s"
