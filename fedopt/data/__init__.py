"""Bundled data sets and partitioners. Nothing here downloads at run time."""

from .array import ArrayTask
from .dataset import DatasetTask
from .partition import PartitionSpec, dirichlet_partition, iid_partition, partition_indices

__all__ = ["ArrayTask", "DatasetTask", "PartitionSpec", "dirichlet_partition", "iid_partition", "partition_indices"]
