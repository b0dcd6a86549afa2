"""Batched multi-prefix serving: many users' prefixes in one batch over one base model."""

from .engine import Engine, GenerationRequest, GenerationResult

__all__ = ["Engine", "GenerationRequest", "GenerationResult"]
