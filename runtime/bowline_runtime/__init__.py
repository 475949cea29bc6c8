"""Bowline runtime: OpenAI-compatible serving on a device-abstracted continuous-batching engine."""

__version__ = "0.1.0"
