"""shadowctl.tap."""
