"""Model registry: built-ins, installed plugins (entry points `hpcml.models`) and trusted
`module:function` specs. Models know nothing of ranks or devices."""

from hpcml.models.registry import create_model, default_model_for, describe_models, list_models

__all__ = ["create_model", "default_model_for", "describe_models", "list_models"]
