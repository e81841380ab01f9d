"""Gossip mode: peers that train and average with their neighbours, with no coordinator."""
