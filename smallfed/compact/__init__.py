"""Compact on-device models: federated pruning, quantization, export."""
