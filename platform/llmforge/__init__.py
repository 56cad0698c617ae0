"""llmforge: raw text to a served, autoscaled DeepSeek-style language model on Ray."""

__version__ = "0.1.0"
