"""Model registry: architectures by name. Models know nothing of ranks or devices."""

from hpcml.models.registry import create_model, default_model_for, list_models

__all__ = ["create_model", "default_model_for", "list_models"]
