"""The glue to Flower: the ServerApp and ClientApp, the strategy wrapper, Grids.

Import from the submodules (``smallfed.flower.client``, ``.server``, ...): this package
imports nothing itself, so a device's ClientApp does not load the server's modules
(and their opacus and scipy imports) into its memory.
"""
