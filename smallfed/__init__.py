"""smallfed: federated, privacy-preserving learning of small models on phones and IoT devices."""

__version__ = "0.1.0"
