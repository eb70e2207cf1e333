"""Parallelism stays here: data parallel launch (torch.distributed elastic) and process groups.

Models know nothing of ranks; the training run receives a `DistInfo` and wraps the model here.
"""
