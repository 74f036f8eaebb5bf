"""Hyperparameter sweeps on Optuna: a sweep file, workers on any machine sharing one study, each
trial the train stage's own computation tracked as one MLflow run (see docs/sweeps.md)."""
