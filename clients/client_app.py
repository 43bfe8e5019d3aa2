"""The ClientApp entry point for `flwr run` and for SuperNodes: configuration from run_config."""

from smallfed.flower.client import build_client_app

app = build_client_app()
