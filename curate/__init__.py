"""curate: targeted real or synthetic data for adapting CLIP."""

__version__ = "0.1.0"
