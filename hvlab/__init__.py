"""hvlab: HunyuanVideo, taken apart into inspectable units."""
__version__ = "0.1.0"
