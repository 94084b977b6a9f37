"""A front end: the project's API served over OpenAI-compatible engines (`--backend URL`) instead of a local model."""

from .engine import UpstreamEngine, UpstreamRejected

__all__ = ["UpstreamEngine", "UpstreamRejected"]
