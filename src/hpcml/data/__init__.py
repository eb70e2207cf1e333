"""Data: sources (built-in datasets), preprocessing fitted on train only, device-resident batches."""

from hpcml.data.sources import Dataset, list_datasets, load_dataset

__all__ = ["Dataset", "list_datasets", "load_dataset"]
