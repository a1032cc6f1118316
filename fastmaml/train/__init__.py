"""Meta-training jobs run by `fastmaml train <job>`."""
