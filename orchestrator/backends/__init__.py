"""Where workers run beyond this host."""
