"""The ServerApp entry point for `flwr run`: configuration from run_config."""

from smallfed.flower.server import build_server_app

app = build_server_app()
