"""Workers as processes: their environment, supervision, lanes, progress and merges."""
