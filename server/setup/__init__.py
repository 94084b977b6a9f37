"""First start and repair: the model download (bootstrap), the bundle's package installer and the GPU check.
It never imports torch (tests/test_layers.py): it runs before torch is there, or to install it."""
