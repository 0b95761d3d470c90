"""Datasets: registry, canonical folders and CSVs, synthetic sets, official-layout preparation."""
from samfit.data.folder import SegmentationFolder, fraction_pairs, selection_pairs, split_pairs
from samfit.data.registry import DatasetSpec, data_root, dataset_dir, ensure_available, load_registry, resolve_dataset

__all__ = ["DatasetSpec", "SegmentationFolder", "data_root", "dataset_dir", "ensure_available", "load_registry",
           "resolve_dataset", "selection_pairs", "split_pairs", "fraction_pairs"]
