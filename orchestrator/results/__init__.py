"""The run folder: its files, lock, summaries, statistics, resume and rescore."""
