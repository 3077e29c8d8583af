"""The controlled noisy-feedback benchmark: generation, hidden utility, simulated users, eval."""
