"""Everything a person or a CI job reads of a run, rendered from the run folder alone (so `report RUN_DIR` can
redo it at any time): the summary and its statistics, the quality gates, the terminal table, report.md,
report.html and JUnit XML, and `publish`, which writes them all at the end of a run."""
