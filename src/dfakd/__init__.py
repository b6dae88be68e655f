"""dfakd: Differentiable Feature Aggregation search for Knowledge Distillation, as a reproducible pipeline."""

__version__ = "0.1.0"
