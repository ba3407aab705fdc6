"""DNA: block-wise distilled neural architecture search."""

__version__ = "0.1.0"
