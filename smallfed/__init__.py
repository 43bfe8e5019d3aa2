"""smallfed: federated, privacy-preserving learning of small models on phones and IoT devices."""

__version__ = "0.1.0"

__all__ = ["simulate"]


def __getattr__(name: str):  # type: ignore[no-untyped-def]
    """``smallfed.simulate`` is imported when first used: a device importing the ClientApp
    (``smallfed.flower.client``) must not load the server's engines."""
    if name == "simulate":
        from smallfed.api import simulate

        return simulate
    raise AttributeError(f"module 'smallfed' has no attribute {name!r}")
