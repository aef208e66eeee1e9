"""The chain onto the device: weights, dtype and the adapter lineage, as one model."""
