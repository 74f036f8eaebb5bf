"""A worker's trials: each claims its place in the budget before it trains, and one that raises
fails alone (a FAIL trial, one line) until `max_failures` in a row stop the worker."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import optuna
from optuna.trial import TrialState

from pipeline.common.credentials import redact
from pipeline.common.errors import PipelineError
from pipeline.sweep.study import DONE, count, fail_stale

log = logging.getLogger(__name__)
# What fills the budget when a trial starts: every trial that is or may still become COMPLETE or PRUNED.
CLAIMED = (TrialState.WAITING, TrialState.RUNNING, *DONE)
SURPLUS_ATTR = "surplus"  # a trial that found the budget spent when it started: FAIL, never trained
WAIT_SECONDS = 2.0  # how often an idle worker looks at trials running elsewhere


class BudgetSpent(Exception):
    """A trial started after the budget was claimed by trials numbered before it (a race between workers)."""


class TrialFailed(Exception):
    """A trial that raised: its one-line reason; the trial is FAIL and the worker goes on."""


class _OneLine(logging.Filter):
    """Optuna logs a failed trial with its traceback; ours have said why in one line already."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], BudgetSpent | TrialFailed):
            record.exc_info = None
        return True


logging.getLogger("optuna.study._optimize").addFilter(_OneLine())


def claim(trial: optuna.Trial, budget: int) -> None:
    """Let `trial` train only if the trials numbered before it leave room in the budget.

    Optuna numbers a study's trials in the order they are created, under a lock on the study's row
    (SQLite locks the whole file), so every trial numbered before this one is visible now; states
    only move from WAITING or RUNNING to COMPLETE, PRUNED or FAIL. So at most `budget` trials pass
    this check and end COMPLETE or PRUNED, whatever the number of workers and machines."""
    before = [t for t in trial.study.get_trials(deepcopy=False, states=CLAIMED) if t.number < trial.number]
    if len(before) >= budget:
        trial.set_user_attr(SURPLUS_ATTR, True)
        raise BudgetSpent(f"trial {trial.number}: the budget of {budget} trials was claimed by earlier trials")


def run_trials(
    study: optuna.Study, objective: Callable[[optuna.Trial], float], budget: int, max_failures: int,
    wait: float = WAIT_SECONDS,
) -> int:  # fmt: skip
    """Run trials until the study holds `budget` complete or pruned ones; return how many it holds.

    A trial that raises is FAIL and the next one starts; `max_failures` in a row stop the worker. A
    trial whose worker died is failed after 2 heartbeats and run again here (WAITING, Optuna's retry)."""
    failures: list[str] = []  # the reasons of the failures in a row

    def claimed(trial: optuna.Trial) -> float:
        claim(trial, budget)
        try:
            value = objective(trial)
        except optuna.TrialPruned:
            failures.clear()
            raise
        except Exception as e:
            failures.append(one_line(e))
            log.warning("trial %d failed: %s", trial.number, failures[-1])
            raise TrialFailed(failures[-1]) from e
        failures.clear()
        return value

    waiting_said = False
    while True:
        fail_stale(study)
        done = count(study, *DONE)
        if done >= budget:
            return done
        if len(failures) >= max_failures:
            raise PipelineError(
                f"{len(failures)} trials in a row failed here (max_failures), the last with {failures[-1]}; "
                "this worker stops, the study keeps its trials"
            )
        queued = count(study, TrialState.WAITING)  # retries of trials whose worker died
        running = count(study, TrialState.RUNNING)
        if not queued and done + running >= budget:  # the rest is running elsewhere: wait
            if not waiting_said:
                log.info("%d trial(s) left, running in other workers; waiting in case one dies", running)
                waiting_said = True
            time.sleep(wait)
            continue
        study.optimize(claimed, n_trials=1, gc_after_trial=False, catch=(BudgetSpent, TrialFailed))


def one_line(e: BaseException) -> str:
    """An exception as one line without credentials: its type and the first line of its message."""
    text = str(e).strip().splitlines()
    return redact(f"{type(e).__name__}: {text[0]}" if text else type(e).__name__)
