"""Secure aggregation (SecAgg+, Bell et al. 2020) as pure functions; see :mod:`.protocol`."""

from smallfed.secagg.protocol import (
    Params,
    SecAggError,
    check_vector,
    choose_degree,
    choose_graph,
    client_keys,
    client_masked,
    client_shares,
    client_unmask,
    server_unmask,
)

__all__ = [
    "Params",
    "SecAggError",
    "check_vector",
    "choose_degree",
    "choose_graph",
    "client_keys",
    "client_masked",
    "client_shares",
    "client_unmask",
    "server_unmask",
]
