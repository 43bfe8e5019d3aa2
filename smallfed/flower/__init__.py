"""The glue to Flower: the ServerApp and ClientApp, the strategy wrapper, Grids."""

from smallfed.flower.client import build_client_app
from smallfed.flower.inprocess import InProcessGrid
from smallfed.flower.grids import MeteredGrid
from smallfed.flower.server import build_server_app, run_server
from smallfed.flower.strategy import SmallfedStrategy, make_inner_strategy

__all__ = [
    "InProcessGrid",
    "MeteredGrid",
    "SmallfedStrategy",
    "build_client_app",
    "build_server_app",
    "make_inner_strategy",
    "run_server",
]
