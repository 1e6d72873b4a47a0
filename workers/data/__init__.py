"""Loading a job's dataset from its URI, safely, into arrays ready for torch (DESIGN.md §4 and §7)."""
from workers.data.dataset import Dataset, split_validation
from workers.data.loading import load_dataset
from workers.data.uris import fetch

__all__ = ["Dataset", "fetch", "load_dataset", "split_validation"]
