"""shadowctl.routers."""
