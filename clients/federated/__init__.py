"""Federated mode: one client process on its private shard, served by a coordinator over the bus."""
