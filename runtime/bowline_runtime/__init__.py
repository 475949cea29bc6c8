"""Bowline runtime: OpenAI-compatible serving on a device-abstracted continuous-batching engine.

`from bowline_runtime import LLM, SamplingParams` is the offline Python API (bowline_runtime.offline),
imported on first use so that importing the package for the server or the CLI stays light.
"""

__version__ = "0.1.0"

_OFFLINE = {"LLM", "SamplingParams", "RequestOutput", "CompletionOutput"}


def __getattr__(name: str):
    if name in _OFFLINE:
        from bowline_runtime.host_pages import prefer_huge_pages

        prefer_huge_pages()  # weights and KV cache on 2 MiB pages as under `serve`, if torch is not loaded yet
        from bowline_runtime import offline

        return getattr(offline, name)
    raise AttributeError(f"module 'bowline_runtime' has no attribute {name!r}")


__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]
