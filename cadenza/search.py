"""`cadenza hyperopt`: Ludwig's `hyperopt:` section run by Optuna (docs/hyperopt.md).

Every searched path and space is checked before any trial: each candidate value (a choice's categories, a range's
ends) is put into the config, which must then load. Trials run in this process, one after another, on the same
splits; the embedding cache makes a head's trial cheap. Each epoch's validation score goes to the Optuna trial,
whose pruner may stop it. With `executor.storage`, processes that run the same experiment name share one study.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

from . import metrics
from .artifacts import write_json
from .config.load import ConfigSource, load_config, read_config_file, to_yaml
from .errors import CadenzaError, ConfigError
from .track import Tracker

STATISTICS_FILE = "hyperopt_statistics.json"
BEST_CONFIG_FILE = "best_config.yaml"
INSTALL_HINT = 'pip install "cadenza[hyperopt]"'


# Ludwig's space names -> Optuna's suggest calls. Ludwig (Ray Tune) excludes the upper end of randint and
# lograndint; the q* spaces round to multiples of q.
def _rounded(value: float, q: float) -> float:
    return round(value / q) * q


SPACES: dict[str, Callable[[Any, str, Any], Any]] = {
    "choice": lambda trial, name, p: _categorical(trial, name, p.categories),
    "grid_search": lambda trial, name, p: _categorical(trial, name, p.values),
    "uniform": lambda trial, name, p: trial.suggest_float(name, p.lower, p.upper),
    "quniform": lambda trial, name, p: trial.suggest_float(name, p.lower, p.upper, step=p.q),
    "loguniform": lambda trial, name, p: trial.suggest_float(name, p.lower, p.upper, log=True),
    "qloguniform": lambda trial, name, p: _rounded(trial.suggest_float(name, p.lower, p.upper, log=True), p.q),
    "randint": lambda trial, name, p: trial.suggest_int(name, int(p.lower), int(p.upper) - 1),
    "qrandint": lambda trial, name, p: trial.suggest_int(name, int(p.lower), int(p.upper), step=int(p.q)),
    "lograndint": lambda trial, name, p: trial.suggest_int(name, int(p.lower), int(p.upper) - 1, log=True),
    "qlograndint": lambda trial, name, p: int(_rounded(trial.suggest_int(name, int(p.lower), int(p.upper),
                                                                         log=True), p.q)),
}


def _categorical(trial, name: str, options: list) -> Any:
    """Optuna stores plain values only: lists and mappings go through their JSON text."""
    if all(o is None or isinstance(o, (bool, int, float, str)) for o in options):
        return trial.suggest_categorical(name, options)
    return json.loads(trial.suggest_categorical(name, [json.dumps(o) for o in options]))


def candidates(parameter) -> list:
    """The values a space can yield that are checked before any trial: every category, or both ends of a range."""
    if parameter.space in ("choice", "grid_search"):
        return list(parameter.categories or parameter.values)
    if parameter.space in ("randint", "lograndint"):
        return [int(parameter.lower), int(parameter.upper) - 1]
    if "randint" in parameter.space:
        return [int(parameter.lower), int(parameter.upper)]
    return [parameter.lower, parameter.upper]


# ------------------------------------------------------------------------------------------- config paths
def with_value(raw: dict, path: str, value: Any) -> dict:
    """A copy of `raw` with the dotted `path` set to `value`; features are addressed by name (or position), and
    missing sections are created. Raises KeyError naming the part of the path that names nothing."""
    out = copy.deepcopy(raw)
    node: Any = out
    keys = path.split(".")
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            node = _list_item(node, key, ".".join(keys[:i]))
        elif isinstance(node, dict):
            node = node.setdefault(key, {} if not key.endswith("features") else [])
        if not isinstance(node, (dict, list)):
            raise KeyError(f"{'.'.join(keys[:i + 1])} is a value, not a section")
    if isinstance(node, list):
        raise KeyError(f"{path} names a list item, not a key")
    node[keys[-1]] = value
    return out


def _list_item(items: list, key: str, where: str) -> dict:
    by_name = [item for item in items if isinstance(item, dict) and item.get("name") == key]
    if by_name:
        return by_name[0]
    if key.isdigit() and int(key) < len(items):
        return items[int(key)]
    names = [item.get("name") for item in items if isinstance(item, dict)]
    raise KeyError(f"{where} has no feature named {key!r} (features: {', '.join(map(str, names))})")


def check_search(raw: dict):
    """The hyperopt section, after every problem a trial would meet is reported as one ConfigError: a path that
    names no key, a value a space yields that the key does not take, a metric the scored feature lacks."""
    config = load_config(raw)  # the schema checks every space
    hyperopt = config.hyperopt
    if hyperopt is None:
        raise ConfigError([("hyperopt", "the config has no hyperopt section (docs/hyperopt.md)")])
    base = trial_base(raw)
    problems = [] if hyperopt.parameters else [("hyperopt.parameters", "names no key to search")]
    for path, parameter in hyperopt.parameters.items():
        where = f"hyperopt.parameters.{path}"
        for value in candidates(parameter):
            try:
                load_config(with_value(base, path, value))
            except KeyError as e:
                problems.append((where, e.args[0]))
                break
            except ConfigError as e:
                problems += [(where, f"{value!r}: {p}: {m}" if p else f"{value!r}: {m}") for p, m in e.problems]
                break
    problems += _metric_problems(config)
    if problems:
        raise ConfigError(problems)
    return hyperopt


def _metric_problems(config) -> list[tuple[str, str]]:
    hyperopt = config.hyperopt
    types = {f.name: f.type for f in config.output_features}
    if hyperopt.output_feature != metrics.COMBINED and hyperopt.output_feature not in types:
        return [("hyperopt.output_feature", f"{hyperopt.output_feature!r} is not an output feature; one of "
                 f"{', '.join([metrics.COMBINED, *types])}")]
    offered = metrics.validation_metric_names(types.get(hyperopt.output_feature, metrics.COMBINED),
                                              config.model_type, config.trainer.type)
    if metrics.canonical_name(hyperopt.metric) not in offered:
        return [("hyperopt.metric", f"{hyperopt.output_feature} does not compute {hyperopt.metric!r}; it offers "
                 f"{', '.join(offered)}")]
    return []


def trial_base(raw: dict) -> dict:
    return {k: v for k, v in raw.items() if k != "hyperopt"}


# ------------------------------------------------------------------------------------------- pruning
class TrialReporter(Tracker):
    """The training loop's tracker for a trial: each epoch's validation score goes to the Optuna trial, and a
    trial its pruner gives up on stops with optuna.TrialPruned."""

    def __init__(self, trial, output_feature: str, metric: str, log: Callable[[str], None] = print):
        super().__init__(log=log)
        self.trial, self.output_feature, self.metric = trial, output_feature, metric

    def log_epoch(self, epoch: int, step: int, train_stats: dict, metrics: Optional[dict],
                  learning_rate: Optional[float] = None) -> None:
        score = (metrics or {}).get(self.output_feature, {}).get(self.metric)
        if score is None or not math.isfinite(score):
            return
        self.trial.report(score, epoch)
        if self.trial.should_prune():
            import optuna

            raise optuna.TrialPruned(f"epoch {epoch}: {self.metric} {score:.4g}")


# ------------------------------------------------------------------------------------------- the search
def hyperopt(config: ConfigSource, dataset=None, *, output_directory: Union[str, Path] = "results",
             experiment_name: str = "hyperopt", random_seed: int = 42,
             log: Callable[[str], None] = print) -> dict:
    """Run the search; writes <output_directory>/<experiment_name>/hyperopt_statistics.json (Ludwig's layout:
    hyperopt_config and hyperopt_results, best first) and best_config.yaml. Returns the statistics."""
    raw = read_config_file(config) if isinstance(config, (str, Path)) else copy.deepcopy(config)
    settings = check_search(raw)
    optuna = _optuna()
    from .api import Model

    base = trial_base(raw)
    splits = Model(base, log=lambda _: None)._splits(dataset, None, None, None, random_seed, log)
    folder = Path(output_directory) / experiment_name
    executor = settings.executor
    study = optuna.create_study(study_name=experiment_name, storage=_storage(optuna, executor.storage),
                                load_if_exists=True,
                                direction=settings.goal, sampler=_sampler(optuna, settings, random_seed),
                                pruner=_pruner(optuna, executor.pruner))
    metric = metrics.canonical_name(settings.metric)
    started = time.perf_counter()

    def objective(trial) -> float:
        values = {path: SPACES[p.space](trial, path, p) for path, p in settings.parameters.items()}
        trial_config = base
        for path, value in values.items():
            trial_config = with_value(trial_config, path, value)
        log(f"trial {trial.number}: " + ", ".join(f"{k}={v!r}" for k, v in values.items()))
        model = Model(trial_config, log=lambda _: None)
        out = model.train(training_set=splits["training"], validation_set=splits["validation"],
                          test_set=splits["test"], output_directory=folder, experiment_name="trial",
                          model_name=str(trial.number), random_seed=random_seed, skip_save_model=True,
                          skip_save_log=True, tracker=TrialReporter(trial, settings.output_feature, metric))
        eval_stats, _ = model.evaluate(splits[settings.split])
        score = eval_stats[settings.output_feature][metric]
        for key, value in (("parameters", values), ("config", trial_config), ("eval_stats", eval_stats),
                           ("training_stats", _plain(out.statistics))):
            trial.set_user_attr(key, _plain(value))
        log(f"trial {trial.number}: {settings.output_feature} {metric} {score:.4f} "
            f"({time.perf_counter() - started:.1f} s so far)")
        return score

    stop = optuna.study.MaxTrialsCallback(executor.num_samples,
                                          states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
    study.optimize(objective, n_trials=executor.num_samples, timeout=executor.time_budget_s, callbacks=[stop],
                   catch=(CadenzaError,))
    return write_results(study, raw["hyperopt"], folder, log)


def write_results(study, hyperopt_config: dict, folder: Path, log: Callable[[str], None] = print) -> dict:
    """hyperopt_statistics.json from every finished trial of the study (of all processes), best first, and the
    best trial's config."""
    import optuna

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and "config" in t.user_attrs]
    done.sort(key=lambda t: t.value, reverse=study.direction == optuna.study.StudyDirection.MAXIMIZE)
    results = [{"parameters": t.user_attrs["parameters"], "metric_score": t.value,
                "training_stats": t.user_attrs["training_stats"], "eval_stats": t.user_attrs["eval_stats"]}
               for t in done]
    statistics = {"hyperopt_config": hyperopt_config, "hyperopt_results": results}
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / STATISTICS_FILE, statistics)
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)
    if done:
        (folder / BEST_CONFIG_FILE).write_text(to_yaml(done[0].user_attrs["config"]))
        log(f"best of {len(done)} trials ({pruned} pruned): {done[0].value:.4f} with {done[0].user_attrs['parameters']}"
            f"; {folder / STATISTICS_FILE}, {folder / BEST_CONFIG_FILE}")
    else:
        log(f"no trial finished ({pruned} pruned); {folder / STATISTICS_FILE}")
    return statistics


def _sampler(optuna, settings, random_seed: int):
    seed = settings.search_alg.random_state if settings.search_alg.random_state is not None else random_seed
    kind = settings.executor.sampler
    spaces = {p.space for p in settings.parameters.values()}
    if kind == "auto" and spaces == {"grid_search"}:
        return optuna.samplers.GridSampler({path: p.values for path, p in settings.parameters.items()}, seed=seed)
    if kind == "auto" or kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    return optuna.samplers.CmaEsSampler(seed=seed)


def _storage(optuna, url: Optional[str], attempts: int = 6):
    """The study's RDB storage (None: in memory). Processes that start together race to create its tables, and
    the losers' first tries fail: they try again. SQLite waits up to a minute for another process's write."""
    if url is None:
        return None
    from sqlalchemy.exc import SQLAlchemyError

    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine)
        except SQLAlchemyError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def _pruner(optuna, kind: Optional[str]):
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def _optuna():
    try:
        import optuna
    except ImportError:
        raise CadenzaError(f"cadenza hyperopt needs Optuna: {INSTALL_HINT}") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _plain(value: Any) -> Any:
    """JSON-safe (Optuna's user attributes and the statistics file): numpy numbers and paths become plain."""
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
