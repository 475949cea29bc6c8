"""Bowline operator: reconciles InferenceService resources into runtime Deployments and Services."""

__version__ = "0.1.0"
