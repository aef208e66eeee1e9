"""GPU memory from files: the estimate, the image tokens it counts, and the preflight that refuses."""
