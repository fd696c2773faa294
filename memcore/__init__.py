"""memcore: watch a language model memorize text."""

__version__ = "0.1.0"
