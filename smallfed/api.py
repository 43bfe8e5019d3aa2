"""The Python front door: a run from a configuration and the researcher's own objects.

``smallfed.simulate`` does what ``smallfed simulate`` does, and also takes objects
instead of names: a model factory, a dataset, a Flower strategy (or a layer of your
own around one). An object becomes a name the run records in results.json:

* a function importable by its module and name becomes ``module:function``, which every
  engine can import (Ray's workers included);
* anything else (a lambda, a Dataset object, a function defined in ``__main__``) is
  registered in this process under its own name and runs with ``backend = "inprocess"``.

A strategy object is handed to the server's layers as their innermost strategy; the
run records it as ``module:Class``.
"""

from __future__ import annotations

import importlib
import tomllib
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from flwr.serverapp.strategy import Strategy

from smallfed.config import Config, ConfigError
from smallfed.flower.strategies import OBJECT_PREFIX

ConfigLike = Config | Mapping[str, Any] | str | Path | None


def simulate(  # pylint: disable=too-many-arguments
    config: ConfigLike = None, *, out: str | Path, model: Callable[..., Any] | str | None = None,
    dataset: Any = None, strategy: Strategy | str | None = None, progress: bool = False,
    overwrite: bool = False, resume: bool = False, **changes: Any,
) -> dict[str, Any]:
    """Run a simulation; return results.json's content (also written to ``out``).

    ``config``: a :class:`Config`, a mapping of configuration keys, a TOML file, or None
    for the quickstart. ``changes`` override keys, with underscores for hyphens
    (``num_server_rounds=3``). ``model``: a factory ``(input_shape, num_classes) ->
    nn.Module``. ``dataset``: a :class:`smallfed.data.Dataset`, or a function returning
    one. ``strategy``: a Flower Message-API strategy that aggregates whole client models
    (it is shown only the nodes smallfed sampled; build Flower's own with
    ``smallfed.flower.strategies.NO_SAMPLING``).
    """
    from smallfed.simulation import simulate as run  # the engines: imported when used

    cfg = as_config(config)
    values: dict[str, Any] = {k.replace("_", "-"): v for k, v in changes.items()}
    for key, named in (("model", model), ("dataset", dataset), ("strategy", strategy)):
        if isinstance(named, str):  # a name, as in a configuration file
            values[key] = named
    model, dataset, strategy = (None if isinstance(o, str) else o
                                for o in (model, dataset, strategy))
    cfg = Config.from_mapping({**cfg.to_dict(), **values})
    if model is not None:
        values["model"] = model_name(model, cfg.backend)
    if dataset is not None:
        values["dataset"] = dataset_name(dataset, cfg.backend)
    if strategy is not None:
        if not isinstance(strategy, Strategy):
            raise ConfigError(f"strategy: {type(strategy).__name__} is not a Flower "
                              "flwr.serverapp.strategy.Strategy")
        values["strategy"] = (f"{OBJECT_PREFIX}{type(strategy).__module__}:"
                              f"{type(strategy).__qualname__}")
    cfg = Config.from_mapping({**cfg.to_dict(), **values})
    return run(cfg, out, progress=progress, resume=resume, overwrite=overwrite, inner=strategy)


def as_config(config: ConfigLike) -> Config:
    """A Config from any of the forms :func:`simulate` takes."""
    if isinstance(config, Config):
        return config
    if isinstance(config, (str, Path)):
        return Config.from_toml(config)
    if config is None:
        text = resources.files("smallfed").joinpath("quickstart.toml").read_text()
        return Config.from_mapping(tomllib.loads(text))
    return Config.from_mapping(config)


def dataset_name(dataset: Any, backend: str) -> str:
    """The ``dataset`` value for a Dataset or a function returning one."""
    from smallfed.data import DATASETS, Dataset

    if isinstance(dataset, Dataset):
        name = _local_name(f"python.{dataset.name or 'dataset'}", "dataset", dataset, backend)
        DATASETS[name] = lambda _cfg: dataset
        return name
    if not callable(dataset):
        raise ConfigError(f"dataset: expected a smallfed.data.Dataset or a function returning "
                          f"one, got {type(dataset).__name__}")
    if importable(dataset):
        return f"{dataset.__module__}:{dataset.__qualname__}"
    name = _local_name(_dotted(dataset), "dataset", dataset, backend)
    DATASETS[name] = lambda _cfg: dataset()
    return name


def model_name(factory: Callable[..., Any], backend: str) -> str:
    """The ``model`` value for a factory: its import path, or a name registered here."""
    from smallfed.models import MODELS

    if importable(factory):
        return f"{factory.__module__}:{factory.__qualname__}"
    name = _local_name(_dotted(factory), "model", factory, backend)
    MODELS[name] = factory
    return name


def _dotted(obj: object) -> str:
    """``module.qualname``: a registry name that no built-in one (no dots) can take."""
    qualname = getattr(obj, "__qualname__", type(obj).__name__).replace("<locals>.", "")
    return f"{getattr(obj, '__module__', 'python')}.{qualname}".replace("<", "").replace(">", "")


def _local_name(name: str, key: str, obj: object, backend: str) -> str:
    """``name``, if the run's engine shares this process's registries (a later object of
    the same name replaces an earlier one)."""
    if backend != "inprocess":
        raise ConfigError(
            f"{key}: {obj!r} cannot be imported by name, and Ray's workers know only what "
            f"they import; define it at the top of an importable module, or run with "
            "backend = 'inprocess'")
    return name


def importable(obj: object) -> bool:
    """Can another process find ``obj`` as ``module:qualname``?"""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
    if not module or module == "__main__" or "<" in qualname or "." in qualname:
        return False
    try:
        return getattr(importlib.import_module(module), qualname) is obj
    except (ImportError, AttributeError):
        return False
