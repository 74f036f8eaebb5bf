"""A sweep file, sweeps/<name>.yaml: the search space over params.yaml keys, the objective, the
budget, the sampler and the pruner; validated at load time with the key's name."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from pipeline import recipe
from pipeline.common.errors import ParamsError
from pipeline.params import ModelConfig, TrainConfig, check, configs, read_params

SWEEPS = Path("sweeps")
# The validation metrics a trial reports each epoch, and the way each is better. The test set
# is never used to choose: evaluate reads it once, for the model the sweep picked.
OBJECTIVES = {"val_accuracy": "maximize", "val_loss": "minimize"}
# What a trial runs on is the worker's business (--jobs, one GPU each), not a searched param.
NOT_SEARCHED = {"train.device", "train.nproc", "train.nnodes", "train.rdzv_endpoint"}
SAMPLERS = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler, "grid": None}
PRUNERS = {
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "none": optuna.pruners.NopPruner,
}
KINDS = {"float": ("low", "high"), "int": ("low", "high"), "categorical": ("choices",)}


@dataclass(frozen=True)
class Dimension:
    """One searched key: `float` or `int` in [low, high] (log scale, step), or `categorical` choices."""

    key: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return trial.suggest_categorical(self.key, list(self.choices))

    def contains(self, value: Any) -> bool:
        """Whether `value` is a point of this dimension (a study written elsewhere may hold anything)."""
        if self.kind == "categorical":
            return any(type(value) is type(c) and value == c for c in self.choices)
        number = int if self.kind == "int" else (int, float)
        ok = isinstance(value, number) and not isinstance(value, bool) and math.isfinite(value)
        return ok and self.low <= value <= self.high

    def grid(self) -> list[Any]:
        """Every value, for the grid sampler: categorical choices or an int range."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "int" and not self.log:
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        raise ParamsError(f"params.{self.key}: the grid sampler needs choices or a linear int range, not {self.kind}")


@dataclass(frozen=True)
class Sweep:
    name: str
    path: Path
    digest: str  # SHA-256 of the file: a study belongs to one version of it
    params: tuple[Dimension, ...]
    trials: int
    objective: str = "val_accuracy"
    base: str | None = None  # a recipe the trials start from
    fixed: dict[str, Any] = field(default_factory=dict)
    sampler: dict[str, Any] = field(default_factory=lambda: {"name": "tpe"})
    pruner: dict[str, Any] = field(default_factory=lambda: {"name": "median"})
    heartbeat: int = 10
    max_failures: int = 3  # trials in a row that raise before a worker stops
    base_digest: str | None = None  # SHA-256 of the base recipe's file: a study belongs to one version of it too
    # Each trial trained on each of these seeds, its value their mean (empty: once, on train.seed):
    # a choice that rests on more than one seed's validation noise.
    seeds: tuple[int, ...] = ()

    @property
    def direction(self) -> str:
        return OBJECTIVES[self.objective]

    def make_sampler(self, seed: int | None) -> optuna.samplers.BaseSampler:
        """The sampler the file names, seeded with `seed` (each worker its own: see workers.py); a grid
        always with the file's seed (0 for null): GridSampler orders its points by it and gives trial k
        the k-th, so workers or a resumed run with other seeds would take one point twice."""
        name, options = self.sampler["name"], {k: v for k, v in self.sampler.items() if k not in ("name", "seed")}
        if name == "grid":
            grid = {d.key: d.grid() for d in self.params}
            return optuna.samplers.GridSampler(grid, seed=self.sampler.get("seed") or 0)
        return _construct(SAMPLERS[name], options | {"seed": seed}, f"{self.path}: sampler")

    def make_pruner(self) -> optuna.pruners.BasePruner:
        options = {k: v for k, v in self.pruner.items() if k != "name"}
        return _construct(PRUNERS[self.pruner["name"]], options, f"{self.path}: pruner")

    def overrides(self, trial: optuna.Trial) -> dict[str, Any]:
        """The flat params.yaml keys of one trial: the fixed ones, then the sampled ones."""
        return {**self.fixed, **{d.key: d.suggest(trial) for d in self.params}}

    def configs(self, overrides: dict[str, Any], params: Path = Path("params.yaml")) -> tuple[ModelConfig, TrainConfig]:
        """params.yaml's model and train sections under the base recipe and `overrides`, validated."""
        return configs(self.recipe_values(overrides), params)

    def recipe_values(self, overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """The base recipe with `overrides` on top, as a recipe's sections: what recipes/<sweep>-best.yaml holds."""
        sections: dict[str, dict[str, Any]] = {s: dict(v) for s, v in (_base(self.base) or {}).items()}
        for key, value in overrides.items():
            section, name = key.split(".", 1)
            sections.setdefault(section, {})[name] = value
        return sections


def _base(name: str | None) -> dict[str, dict[str, Any]] | None:
    return recipe.load_recipe(name) if name else None


def _construct(cls: type, options: dict[str, Any], key: str) -> Any:
    try:
        return cls(**options)
    except (TypeError, ValueError) as e:  # an unknown setting or a bad value: Optuna's own words name it
        raise ParamsError(f"{key}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None


def _searchable(key: str, path: Path) -> None:
    section, _, name = key.partition(".")
    fields = {"model": ModelConfig, "train": TrainConfig}.get(section)
    known = fields is not None and name in fields.__dataclass_fields__
    check(known and key not in NOT_SEARCHED, f"{path}: {key}", "a model.* or train.* key of params.yaml", key)


def _dimension(key: str, raw: Any, path: Path) -> Dimension:
    _searchable(key, path)
    where = f"{path}: params.{key}"
    check(isinstance(raw, dict) and raw.get("type") in KINDS, f"{where}.type", "one of float, int, categorical", raw)
    kind = raw["type"]
    allowed = {"type", *KINDS[kind], *(("log", "step") if kind != "categorical" else ())}
    unknown = sorted(set(raw) - allowed)
    check(not unknown, where, f"a mapping of {', '.join(sorted(allowed))}", unknown)
    if kind == "categorical":
        choices = raw.get("choices")
        check(isinstance(choices, list) and len(choices) > 0, f"{where}.choices", "a non-empty list", choices)
        plain = all(c is None or isinstance(c, str | int | float | bool) for c in choices)
        check(plain, f"{where}.choices", "a list of numbers, strings, booleans or null", choices)
        return Dimension(key, kind, choices=tuple(choices))
    low, high = raw.get("low"), raw.get("high")
    number = int if kind == "int" else (int, float)
    for bound, value in (("low", low), ("high", high)):
        ok = isinstance(value, number) and not isinstance(value, bool) and math.isfinite(value)
        check(ok, f"{where}.{bound}", f"a{'n integer' if kind == 'int' else ' number'}", value)
    check(low <= high, f"{where}.high", f">= low ({low})", high)
    log = raw.get("log", False)
    check(isinstance(log, bool) and (not log or low > 0), f"{where}.log", "true only with low > 0", log)
    step = raw.get("step")
    if step is not None:
        ok = isinstance(step, number) and not isinstance(step, bool) and math.isfinite(step) and step > 0
        check(ok, f"{where}.step", f"a positive {'integer' if kind == 'int' else 'number'}", step)
        check(not log, f"{where}.step", "absent with log: true (Optuna takes one or the other)", step)
    return Dimension(key, kind, low=low, high=high, log=log, step=step)


SWEEP_KEYS = {
    "recipe",
    "fixed",
    "params",
    "objective",
    "trials",
    "sampler",
    "pruner",
    "heartbeat",
    "max_failures",
    "seeds",
}


def _read_sweep(name: str, folder: Path) -> tuple[Path, dict[str, Any]]:
    recipe.check_name(name, "sweep")
    path = folder / f"{name}.yaml"
    if not path.is_file():
        found = ", ".join(sorted(p.stem for p in folder.glob("*.yaml"))) or "none"
        raise ParamsError(f"no sweep {name!r} ({path} not found); sweeps: {found}")
    return path, read_params(path)


def load_sweep(name: str, folder: Path = SWEEPS) -> Sweep:
    """Read and check sweeps/<name>.yaml; every key is checked before any trial runs."""
    path, raw = _read_sweep(name, folder)
    unknown = sorted(set(raw) - SWEEP_KEYS)
    check(not unknown, f"{path}", f"a mapping of {', '.join(sorted(SWEEP_KEYS))}", unknown)
    space = raw.get("params")
    check(isinstance(space, dict) and len(space) > 0, f"{path}: params", "a mapping of keys to distributions", space)
    dims = tuple(_dimension(str(k), v, path) for k, v in space.items())
    fixed = raw.get("fixed") or {}
    check(isinstance(fixed, dict), f"{path}: fixed", "a mapping of params.yaml keys to values", fixed)
    for key in fixed:
        _searchable(str(key), path)
    base = raw.get("recipe")
    ok = base is None or (isinstance(base, str) and recipe.NAME.fullmatch(base) is not None)
    check(ok, f"{path}: recipe", "the name of a recipe in recipes/", base)
    objective = raw.get("objective", "val_accuracy")
    check(objective in OBJECTIVES, f"{path}: objective", f"one of {', '.join(OBJECTIVES)}", objective)
    trials = raw.get("trials")
    check(_integer(trials) and trials >= 1, f"{path}: trials", "an integer >= 1", trials)
    sampler = _named(raw.get("sampler", {"name": "tpe"}), SAMPLERS, f"{path}: sampler")
    seed = sampler.get("seed", 0)
    check(seed is None or (_integer(seed) and 0 <= seed < 2**31), f"{path}: sampler.seed", "an integer >= 0", seed)
    pruner = _named(raw.get("pruner", {"name": "median"}), PRUNERS, f"{path}: pruner")
    heartbeat = raw.get("heartbeat", 10)
    check(_integer(heartbeat) and heartbeat >= 1, f"{path}: heartbeat", "whole seconds >= 1", heartbeat)
    max_failures = raw.get("max_failures", 3)
    check(_integer(max_failures) and max_failures >= 1, f"{path}: max_failures", "an integer >= 1", max_failures)
    seeds = raw.get("seeds") or []
    ok = (
        isinstance(seeds, list) and all(_integer(x) and 0 <= x < 2**32 for x in seeds) and len(set(seeds)) == len(seeds)
    )
    check(ok, f"{path}: seeds", "a list of distinct integers >= 0 (each trial trains on each)", seeds)
    seeded = "train.seed" in fixed or any(d.key == "train.seed" for d in dims)
    check(not (seeds and seeded), f"{path}: seeds", "absent where train.seed is fixed or searched", seeds)
    sweep = Sweep(
        name=name,
        path=path,
        digest=_digest(path),
        params=dims,
        trials=trials,
        objective=objective,
        base=base,
        fixed={str(k): v for k, v in fixed.items()},
        sampler=sampler,
        pruner=pruner,
        heartbeat=heartbeat,
        max_failures=max_failures,
        base_digest=_digest(recipe.RECIPES / f"{base}.yaml") if base else None,
        seeds=tuple(seeds),
    )
    # Fail now, not in trial 7: the base recipe, the settings of sampler and pruner, points of the space.
    sweep.configs({d.key: d.grid()[0] if d.kind == "categorical" else d.low for d in dims} | sweep.fixed)
    rehearse(sweep)
    return sweep


def rehearse(sweep: Sweep, trials: int = 12) -> None:
    """Build the sampler and pruner and run them on a study in memory: `trials` trials sampled from
    every distribution, reporting 3 epochs each (past TPE's start-up when n_startup_trials is small).
    A setting that Optuna refuses only there (a string for a number, a percentile of 200) fails
    now with the key's name, not inside the first trial of every worker."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in memory" at each load
    try:
        sampler = sweep.make_sampler(seed=0)
        if sweep.sampler["name"] == "grid":  # built above; in a study it stops it once the grid is done
            sampler = optuna.samplers.RandomSampler(seed=0)
        study = optuna.create_study(sampler=sampler, pruner=sweep.make_pruner(), direction=sweep.direction)
        _rehearse(sweep, study, trials)
    finally:
        optuna.logging.set_verbosity(verbosity)


def _rehearse(sweep: Sweep, study: optuna.Study, trials: int) -> None:
    for i in range(trials):
        trial = study.ask()
        where = f"{sweep.path}: sampler"
        try:
            for d in sweep.params:
                where = f"{sweep.path}: params.{d.key} (or the sampler)"
                d.suggest(trial)
            where = f"{sweep.path}: pruner"
            for epoch in (1, 2, 3):
                trial.report(0.5 + 0.01 * ((i * 7 + epoch) % 10), epoch)
                trial.should_prune()
            study.tell(trial, 0.5 + 0.01 * (i % 10))
        except (TypeError, ValueError, ArithmeticError, KeyError, IndexError) as e:
            raise ParamsError(f"{where}: {type(e).__name__}: {str(e).strip()[:200] or 'refused'}") from None


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _named(raw: Any, known: dict[str, Any], key: str) -> dict[str, Any]:
    raw = {"name": raw} if isinstance(raw, str) else raw
    check(isinstance(raw, dict) and raw.get("name") in known, f"{key}.name", f"one of {', '.join(known)}", raw)
    return dict(raw)
