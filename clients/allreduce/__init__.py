"""Datacenter mode: the same clients as tightly synced workers on torch.distributed."""
