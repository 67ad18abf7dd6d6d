"""shadowctl.demo."""
