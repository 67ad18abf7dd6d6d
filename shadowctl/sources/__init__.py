"""shadowctl.sources."""
