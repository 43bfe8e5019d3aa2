"""Run by tests/test_deploy.py in a fresh interpreter: a device's ClientApp trains and
evaluates once on its data.npz (argv[1]); print the installed distributions it loaded,
as JSON. Only Flower and this Grid drive it: no ServerApp module is imported."""

import importlib
import json
import sys
from importlib.metadata import packages_distributions

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from smallfed.config import Config
from smallfed.flower.client import build_client_app
from smallfed.flower.inprocess import InProcessGrid
from smallfed.models import build_model

importlib.import_module("clients.client_app")  # the ClientApp a SuperNode loads
importlib.import_module("smallfed.cli")  # `smallfed edge start`
cfg = Config()
grid = InProcessGrid(build_client_app(cfg), 1, run_config=cfg.to_dict(),
                     node_configs=[{"data-dir": sys.argv[1], "device": "rpi4"}])
node = next(iter(grid.get_node_ids()))
arrays = ArrayRecord(build_model(cfg.model, (1, 8, 8), 10, 0).state_dict())
shape = {"input-shape": [1, 8, 8], "num-classes": 10, "server-round": 1}
replies = list(grid.send_and_receive([
    Message(RecordDict({"arrays": arrays, "config": ConfigRecord(dict(shape))}), node, kind)
    for kind in ("train", "evaluate")]))
assert not any(r.has_error() for r in replies), [r.error for r in replies if r.has_error()]
assert np.isfinite(replies[1].content["metrics"]["eval-loss"])
owners = packages_distributions()
loaded = {name.split(".")[0] for name in sys.modules}
print(json.dumps(sorted({dist for name in loaded for dist in owners.get(name, [])})))
