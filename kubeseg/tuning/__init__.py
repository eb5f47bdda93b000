"""Hyperparameter tuning: a Katib Experiment for the cluster, the same search locally."""
