"""Layer 1: typed configs, errors, paths, atomic writes, devices. Imports nothing else of bertnmt."""

__version__ = "0.1.0"
