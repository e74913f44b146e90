"""Accuracy on a dataset in PaliGemma JSONL: reading and checking datasets, metrics per task, the eval loop.

``datasets`` reads both layouts in use (Roboflow's export, maestro's split folders) and refuses bad
data with ``file:line: what is wrong``; ``metrics`` scores each task kind with the field's libraries
(pycocotools, rapidfuzz, sacrebleu); ``evaluate`` runs a loaded bundle over a dataset.
Importing this package imports none of those libraries: each metric imports its own when it runs.
"""

from .datasets import Dataset, DatasetError, DatasetSummary, Problem, Record, check_dataset, load_dataset, parse_spec

__all__ = ["Dataset", "DatasetError", "DatasetSummary", "Problem", "Record", "check_dataset", "load_dataset",
           "parse_spec"]
