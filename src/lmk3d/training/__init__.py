"""Training: the shared loop, losses and patch samplers."""
