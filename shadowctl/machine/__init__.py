"""shadowctl.machine: the pure rollout state machine."""
