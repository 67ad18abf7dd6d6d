"""shadowctl.controller."""
