"""Worked example (docs/extending.md): a dataset read from a CSV list of triplets.

``DATASETS.ROOT_DIR/triplets.csv`` has the header ``split,pid,camid,rgb,ni,ti``; ``split`` is
train, query or gallery, the three paths are relative to ``DATASETS.ROOT_DIR``.

    IMPORTS: [docs/examples/csv_dataset.py]
    DATASETS:
      NAMES: CSVTriplets
      ROOT_DIR: /data/my_set
"""
import csv
import os

from data.datasets import DATASET_REGISTRY, ReIDDataset, Sample, relabel


@DATASET_REGISTRY.register()
class CSVTriplets(ReIDDataset):
    name = "CSVTriplets"
    LIST = "triplets.csv"

    def __init__(self, root: str) -> None:
        path = os.path.join(root, self.LIST)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"CSVTriplets: no {self.LIST} in DATASETS.ROOT_DIR {root!r}")
        splits = {"train": [], "query": [], "gallery": []}
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                paths = tuple(os.path.join(root, row[m]) for m in ("rgb", "ni", "ti"))
                splits[row["split"]].append(Sample(paths, int(row["pid"]), int(row["camid"])))
        for split, samples in splits.items():
            if not samples:
                raise ValueError(f"CSVTriplets: {path} lists no {split} triplet")
        # Training identities are the classifier's classes: relabel them 0..n-1.
        super().__init__(relabel(splits["train"]), splits["query"], splits["gallery"],
                         dataset_dir=root)
