"""Hyperparameter search: one Optuna study, run inside one pipeline step.

Why one step and not a KFP ``ParallelFor`` of trials: Hyperband and ASHA stop weak trials
early by comparing the *intermediate* scores of trials that are still running (their
validation metric after 1, 3, 9, … epochs). That needs every trial to report into one shared
study while it runs; a fan-out of independent pods could only compare finished trials. So the
trials run in ``parallelTrials`` threads of one process against one in-memory study.

Algorithms (all seeded with ``tuning.seed``):

=========== ============================= ==========================================
algorithm   sampler                       pruner
=========== ============================= ==========================================
grid        GridSampler (every point)     none
random      RandomSampler                 none
bayesian    TPESampler (multivariate)     none
hyperband   TPESampler                    HyperbandPruner (resource = epochs)
asha        TPESampler                    SuccessiveHalvingPruner (asynchronous)
cmaes       CmaEsSampler (+ TPE, see      none
            below)
gp          GPSampler                     none
=========== ============================= ==========================================

CMA-ES adapts one multivariate normal over the int and float parameters (int and stepped
ones with a margin, so the search does not collapse onto one integer). It has no notion of a
categorical dimension: Optuna samples those with the sampler's *independent* sampler, one
parameter at a time, without regard to the numeric ones. We make that a seeded univariate TPE
rather than Optuna's default random sampler, so a good category is still learnt from the
trials, and log one warning per study naming those parameters (instead of Optuna's warning on
every trial). With no numeric parameter at all there is nothing for CMA-ES to do: the spec
refuses ``cmaes`` then (CEL at apply, the model and :func:`validate` here).

GP models the objective with a Gaussian process (Matérn 5/2 kernel, Hamming distance for
categorical parameters, so it needs no fallback) and picks the next point by log expected
improvement; it uses torch and scipy. ``deterministic_objective`` stays off: with
``parallelTrials`` > 1 the same parameters need not score the same (see Reproducibility), so
the GP keeps a noise term.

Search space: ``int`` and ``float`` parameters are sampled between ``min`` and ``max``
(``log`` on a log scale, ``step`` on a linear grid), ``categorical`` ones from ``values``. The
grid of a numeric parameter is ``min, min+step, …, max``; on a log scale ``step`` counts
decades (min=1e-4, max=1e-2, step=1 → 1e-4, 1e-3, 1e-2). A grid search runs every point, so
it needs ``maxTrials`` at least the grid size.

The validation of the search space (every error names ``tuning.searchSpace[i].<field>``) makes
this module longer than the house ~400 lines.

Reproducibility: with ``parallelTrials: 1`` a rerun with the same seed proposes, prunes and
scores the same trials on the same device. With more, the order in which trials finish (and
so what the sampler has seen) and the dropout draws (torch's generator is process-wide) vary.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kubeloop.api.training_run import Imbalance, ModelSpec, SearchParameter, Tuning
from kubeloop.contract.evaluation import LOWER_IS_BETTER
from kubeloop_pipelines.contract import StepError
from kubeloop_pipelines.ml.models import (
    TUNABLE_PARAMS,
    apply_params,
    param_key,
    parse_param,
)
from kubeloop_pipelines.ml.train import check_metric

logger = logging.getLogger(__name__)

# The objective: hyperparameters → validation score. It calls ``report(epoch, value)`` after
# every epoch; ``report`` raises ``optuna.TrialPruned`` when the pruner stops the trial.
Report = Callable[[int, float], None]
Objective = Callable[[dict[str, Any], Report], float]


@dataclass
class TrialRecord:
    """One finished trial."""

    number: int
    state: str  # complete | pruned | failed
    value: float | None
    params: dict[str, Any]
    epochs: int  # epochs reported (how far it trained)
    seconds: float
    error: str = ""
    last_report: float | None = None  # the last per-epoch value (where a pruned trial stood)


@dataclass
class TuneProgress:
    """The study after a trial finished (what the operator shows as ``trial 7/20``)."""

    completed: int  # finished trials, pruned and failed included
    total: int
    pruned: int
    failed: int
    best_params: dict[str, Any]
    best_value: float | None
    last: TrialRecord

    def trials_status(self) -> dict[str, Any]:
        """The record of ``status.trials`` (camelCase, params as short strings)."""
        return {
            "completed": self.completed,
            "total": self.total,
            "pruned": self.pruned,
            "progress": f"{self.completed}/{self.total}",
            "bestParams": {k: format_param(v) for k, v in self.best_params.items()},
            "bestValue": self.best_value,
        }


@dataclass
class TuneResult:
    algorithm: str
    metric: str
    direction: str
    total: int
    best_params: dict[str, Any]
    best_value: float
    trials: list[TrialRecord] = field(default_factory=list)
    seconds: float = 0.0
    sampler: str = ""  # the Optuna sampler's class, e.g. CmaEsSampler

    @property
    def completed(self) -> int:
        return sum(t.state == "complete" for t in self.trials)

    @property
    def pruned(self) -> int:
        return sum(t.state == "pruned" for t in self.trials)

    @property
    def failed(self) -> int:
        return sum(t.state == "failed" for t in self.trials)


def format_param(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


# --- the search space --------------------------------------------------------------------


def _round(value: float) -> float:
    """Grid points without float noise (0.30000000000000004 → 0.3)."""
    return float(f"{value:.10g}")


def grid_values(param: SearchParameter) -> list[Any]:
    """The points of one parameter in a grid search."""
    if param.type == "categorical":
        return list(param.values or [])
    low, high, step = float(param.min or 0.0), float(param.max or 0.0), float(param.step or 0.0)
    if param.log:
        exponents = np.arange(math.log10(low), math.log10(high) + step / 2, step)
        points = [_round(10.0**e) for e in exponents]
    else:
        points = [_round(v) for v in np.arange(low, high + step / 2, step)]
    if param.type == "int":
        return sorted({round(p) for p in points})
    return points


def grid_size(tuning: Tuning) -> int:
    return math.prod(len(grid_values(p)) for p in tuning.search_space)


def _check_value(index: int, param: SearchParameter, attr: str, value: Any) -> None:
    """StepError naming ``tuning.searchSpace[i].<attr>`` unless ``value`` is a valid value of
    the parameter's spec field."""
    try:
        apply_params(ModelSpec(), Imbalance(), {param.name: parse_param(param.name, value)})
    except StepError as exc:
        raise StepError(
            f"tuning.searchSpace[{index}].{attr}: {exc.message}",
            field=f"tuning.searchSpace[{index}].{attr}",
        ) from None


def validate(tuning: Tuning, task: str) -> None:
    """Check the search space and objective before any trial runs; every StepError names the
    field at fault (``tuning.searchSpace[i].name``, ``tuning.objective.metric``, …)."""
    metric, direction = tuning.objective.metric, tuning.objective.direction
    check_metric(metric, task, field_name="tuning.objective.metric")
    wanted = "minimize" if metric in LOWER_IS_BETTER else "maximize"
    if direction != wanted:
        raise StepError(
            f"tuning.objective.direction={direction!r} with metric {metric!r} would pick the "
            f"worst model: {metric} is better when {'lower' if wanted == 'minimize' else 'higher'}"
            f"; expected {wanted!r}",
            field="tuning.objective.direction",
        )
    if not tuning.search_space:
        raise StepError(
            "tuning.searchSpace is empty; expected at least one parameter, e.g. "
            "{name: learningRate, type: float, min: 1e-4, max: 1e-2, log: true}",
            field="tuning.searchSpace",
        )
    seen: dict[str, int] = {}
    for i, param in enumerate(tuning.search_space):
        where = f"tuning.searchSpace[{i}]"
        key = param_key(param.name)
        if key not in TUNABLE_PARAMS:
            raise StepError(
                f"{where}.name={param.name!r} is not a tunable hyperparameter; expected one of "
                f"{', '.join(TUNABLE_PARAMS)}",
                field=f"{where}.name",
            )
        if key in seen:
            raise StepError(
                f"{where}.name={param.name!r} repeats tuning.searchSpace[{seen[key]}]; each "
                "hyperparameter may appear once",
                field=f"{where}.name",
            )
        seen[key] = i
        if param.type == "categorical":
            if not param.values:
                raise StepError(
                    f"{where}.values is empty; a categorical parameter needs at least one value",
                    field=f"{where}.values",
                )
            for value in param.values:
                _check_value(i, param, "values", value)
            continue
        if param.min is None or param.max is None or not param.min < param.max:
            raise StepError(
                f"{where}: min={param.min} max={param.max}; a numeric parameter needs min < max",
                field=f"{where}.min",
            )
        if param.log and param.min <= 0:
            raise StepError(
                f"{where}.min={param.min}: a log scale needs min > 0",
                field=f"{where}.min",
            )
        if param.type == "int" and math.ceil(param.min) > math.floor(param.max):
            raise StepError(
                f"{where}: no integer lies between min={param.min} and max={param.max}",
                field=f"{where}.max",
            )
        for attr in ("min", "max"):
            bound = getattr(param, attr)
            _check_value(i, param, attr, int(bound) if param.type == "int" else bound)
        if tuning.algorithm == "grid" and param.step is None:
            raise StepError(
                f"{where}.step is unset; grid search needs a step on every numeric parameter "
                "(or use categorical values)",
                field=f"{where}.step",
            )
    if tuning.algorithm == "cmaes" and not numeric_params(tuning):
        raise StepError(
            f"tuning.algorithm='cmaes' with only categorical parameters "
            f"({', '.join(p.name for p in tuning.search_space)}): CMA-ES searches int and float "
            "parameters, at least one is needed; use grid, random, bayesian or gp",
            field="tuning.searchSpace",
        )
    if tuning.algorithm == "grid":
        size = grid_size(tuning)
        if size > tuning.max_trials:
            dims = " x ".join(str(len(grid_values(p))) for p in tuning.search_space)
            raise StepError(
                f"tuning.searchSpace spans a grid of {size} points ({dims}) but "
                f"tuning.maxTrials={tuning.max_trials}; a grid search runs every point: raise "
                f"maxTrials to {size}, coarsen the steps, or use algorithm random/bayesian",
                field="tuning.searchSpace",
            )


def suggest(trial: Any, tuning: Tuning) -> dict[str, Any]:
    """One trial's hyperparameters (spec names → values; categorical values stay strings)."""
    params: dict[str, Any] = {}
    for param in tuning.search_space:
        name = param.name
        if tuning.algorithm == "grid":
            params[name] = trial.suggest_categorical(name, grid_values(param))
        elif param.type == "categorical":
            params[name] = trial.suggest_categorical(name, list(param.values or []))
        elif param.type == "int":
            low, high = math.ceil(float(param.min or 0)), math.floor(float(param.max or 0))
            int_step = 1 if param.log or not param.step else max(int(param.step), 1)
            params[name] = trial.suggest_int(name, low, high, step=int_step, log=param.log)
        else:
            # Optuna cannot combine a step with a log scale: the log scale wins.
            step = None if param.log else param.step
            params[name] = trial.suggest_float(
                name, float(param.min or 0), float(param.max or 0), step=step, log=param.log
            )
    return params


def numeric_params(tuning: Tuning) -> list[SearchParameter]:
    """The int and float parameters of the search space (what CMA-ES models)."""
    return [p for p in tuning.search_space if p.type != "categorical"]


def make_sampler(tuning: Tuning) -> Any:
    """The seeded Optuna sampler of ``tuning.algorithm`` (the table above)."""
    import optuna

    seed = tuning.seed
    if tuning.algorithm == "grid":
        space = {p.name: grid_values(p) for p in tuning.search_space}
        return optuna.samplers.GridSampler(space, seed=seed)
    if tuning.algorithm == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # The model-based samplers' random start-up phase, scaled to small budgets (Optuna's
    # default is 10 trials for TPE and GP).
    startup = max(2, min(10, tuning.max_trials // 5))
    if tuning.algorithm == "cmaes":
        return _cmaes_sampler(tuning, startup)
    if tuning.algorithm == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True)


def _cmaes_sampler(tuning: Tuning, startup: int) -> Any:
    import optuna

    categorical = [p.name for p in tuning.search_space if p.type == "categorical"]
    if categorical:
        logger.warning(
            "tuning.algorithm=cmaes: CMA-ES models only the numeric parameters; the categorical "
            "%s sampled independently by a seeded TPE",
            f"{', '.join(categorical)} {'is' if len(categorical) == 1 else 'are'}",
        )
    # A margin keeps the distribution from fixing an int (or stepped) dimension to one value.
    discrete = any(
        p.type == "int" or (p.step is not None and not p.log) for p in numeric_params(tuning)
    )
    with warnings.catch_warnings():
        # with_margin is marked experimental in Optuna; the choice is deliberate (above).
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.CmaEsSampler(
            seed=tuning.seed,
            # CMA-ES itself needs no random start (it starts at the centre of the space); the
            # categorical dimensions' TPE does.
            n_startup_trials=1,
            independent_sampler=optuna.samplers.TPESampler(
                seed=tuning.seed, n_startup_trials=startup
            ),
            warn_independent_sampling=False,
            with_margin=discrete,
        )


def _pruner(tuning: Tuning, max_resource: int) -> Any:
    import optuna

    if tuning.algorithm == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=1, max_resource=max(max_resource, 1), reduction_factor=3
        )
    if tuning.algorithm == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    return optuna.pruners.NopPruner()


def max_epochs(tuning: Tuning, model: ModelSpec) -> int:
    """The pruners' resource budget: the most epochs any trial can train."""
    for param in tuning.search_space:
        if param_key(param.name) == "epochs":
            if param.type == "categorical":
                return max(int(v) for v in param.values or ["1"])
            return int(param.max or model.epochs)
    return model.epochs


# --- the study ---------------------------------------------------------------------------


def run_study(
    tuning: Tuning,
    objective: Objective,
    *,
    task: str,
    max_resource: int,
    progress: Callable[[TuneProgress], None] | None = None,
) -> TuneResult:
    """Run the study: ``objective(params, report)`` per trial, ``parallelTrials`` at a time,
    ``maxTrials`` in all (a grid: every point). ``progress`` is called after every trial
    (serialised, from the worker threads). A trial whose parameters the objective rejects with
    a StepError fails and the study goes on; if no trial completes, that error is raised."""
    import optuna

    validate(tuning, task)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    total = grid_size(tuning) if tuning.algorithm == "grid" else tuning.max_trials
    study = optuna.create_study(
        # Hyperband assigns trials to brackets by hashing the study name: fixed for reruns.
        study_name=f"kubeloop-{tuning.algorithm}-{tuning.seed}",
        direction=tuning.objective.direction,
        sampler=make_sampler(tuning),
        pruner=_pruner(tuning, max_resource),
    )
    lock = threading.Lock()
    records: dict[int, TrialRecord] = {}
    errors: dict[int, StepError] = {}
    epochs: dict[int, int] = {}
    last_reports: dict[int, float] = {}
    started: dict[int, float] = {}

    def trial_objective(trial: optuna.Trial) -> float:
        started[trial.number] = time.perf_counter()
        params = suggest(trial, tuning)

        def report(epoch: int, value: float) -> None:
            epochs[trial.number] = epoch
            if not math.isfinite(value):
                return
            last_reports[trial.number] = value
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch} ({value:.4g})")

        try:
            return float(objective(params, report))
        except StepError as exc:
            errors[trial.number] = exc
            raise

    def on_trial(study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
        state = {
            optuna.trial.TrialState.COMPLETE: "complete",
            optuna.trial.TrialState.PRUNED: "pruned",
        }.get(frozen.state, "failed")
        error = errors.get(frozen.number)
        with lock:
            record = TrialRecord(
                number=frozen.number,
                state=state,
                value=frozen.value if state == "complete" else None,
                params=dict(frozen.params),
                epochs=epochs.get(frozen.number, 0),
                seconds=time.perf_counter() - started.get(frozen.number, time.perf_counter()),
                error=error.message if error else "",
                last_report=last_reports.get(frozen.number),
            )
            records[frozen.number] = record
            if progress is not None:
                best_params, best_value = _best(study)
                done = list(records.values())
                progress(
                    TuneProgress(
                        completed=len(done),
                        total=total,
                        pruned=sum(r.state == "pruned" for r in done),
                        failed=sum(r.state == "failed" for r in done),
                        best_params=best_params,
                        best_value=best_value,
                        last=record,
                    )
                )

    began = time.perf_counter()
    study.optimize(
        trial_objective,
        n_trials=total,
        n_jobs=min(tuning.parallel_trials, total),
        catch=(StepError,),
        callbacks=[on_trial],
    )
    best_params, best_value = _best(study)
    if best_value is None:
        first = errors[min(errors)] if errors else None
        if first is not None:
            raise StepError(
                f"no tuning trial completed; the first failed with: {first.message}",
                field=first.field or "tuning.searchSpace",
            )
        raise StepError(
            f"no tuning trial of {total} completed with a finite "
            f"{tuning.objective.metric}; widen tuning.searchSpace or raise tuning.maxTrials",
            field="tuning.searchSpace",
        )
    return TuneResult(
        algorithm=tuning.algorithm,
        metric=tuning.objective.metric,
        direction=tuning.objective.direction,
        total=total,
        best_params=best_params,
        best_value=best_value,
        trials=[records[n] for n in sorted(records)],
        seconds=time.perf_counter() - began,
        sampler=type(study.sampler).__name__,
    )


def _best(study: Any) -> tuple[dict[str, Any], float | None]:
    import optuna

    complete = [
        t
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if t.value is not None and math.isfinite(t.value)
    ]
    if not complete:
        return {}, None
    pick = min if study.direction == optuna.study.StudyDirection.MINIMIZE else max
    best = pick(complete, key=lambda t: t.value)
    return dict(best.params), float(best.value)


def resolved_params(
    model: ModelSpec, imbalance: Imbalance, tuned: Mapping[str, Any]
) -> dict[str, Any]:
    """Every hyperparameter the training step uses (the spec's own values with ``tuned``
    applied), camelCase, values parsed (``hiddenLayers`` as a list)."""
    new_model, new_imbalance = apply_params(model, imbalance, tuned)
    dumped = new_model.model_dump(by_alias=True, exclude={"early_stopping"})
    return {
        **dumped,
        "imbalance.focalGamma": new_imbalance.focal_gamma,
        "imbalance.targetRatio": new_imbalance.target_ratio,
    }
