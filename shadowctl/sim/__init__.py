"""shadowctl.sim."""
