"""shadowctl.judge."""
