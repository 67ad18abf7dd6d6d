"""shadowctl.compare."""
