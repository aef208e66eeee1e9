"""The recipe file, the adapter lineage and the plan: what will run, read from files alone."""
