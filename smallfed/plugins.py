"""Your own code by name: ``package.module:function`` for models, datasets, strategies.

``smallfed simulate`` is a console script, so Python puts its own folder on the
import path, not the folder it runs from; a user's ``my_data.py`` beside their
TOML file would not be found. :func:`load_object` adds the current folder (at the
end, so a file there cannot shadow an installed package) and turns a failed import
into a :class:`~smallfed.config.ConfigError` that says what to do.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from smallfed.config import ConfigError

HOW_TO_FIND = (
    "run from the folder that holds it, or add that folder to PYTHONPATH; under `flwr run`, "
    "list the module's file in fab-include under [tool.flwr.app] in pyproject.toml so it "
    "ships to the SuperLink and SuperNodes"
)


def load_object(target: str, what: str) -> Any:
    """The object ``target`` (``package.module:name``) names; ``what`` is the config key."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr or ":" in attr:
        raise ConfigError(f"{what}: {target!r} is not package.module:function")
    folder = os.getcwd()
    if folder not in sys.path:
        sys.path.append(folder)
        importlib.invalidate_caches()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name != err.name and not module_name.startswith(f"{err.name}."):
            raise ConfigError(f"{what}: importing {module_name!r} failed: it imports "
                              f"{err.name!r}, which is not installed") from err
        raise ConfigError(f"{what}: {target!r}: no module {module_name!r} on the import path "
                          f"(the current folder is {folder}); {HOW_TO_FIND}") from err
    try:
        return getattr(module, attr)
    except AttributeError as err:
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                        and getattr(v, "__module__", None) == module.__name__)
        raise ConfigError(
            f"{what}: {target!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) "
            f"has no {attr!r}; it has {', '.join(public) or 'no public functions'}") from err


def import_plugins(modules: str) -> None:
    """Import the comma-separated ``modules`` (the ``plugins`` key), so that the codec
    stages, datasets, strategies and device profiles they register exist in every
    process that builds the run's Config: the ServerApp, each ClientApp, Ray's workers."""
    for name in filter(None, (m.strip() for m in modules.split(","))):
        load_object(f"{name}:__name__", what="plugins")
