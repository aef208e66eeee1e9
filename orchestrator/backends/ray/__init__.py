"""The Ray backend: a local or remote cluster runs the same workers, one per GPU lane."""
