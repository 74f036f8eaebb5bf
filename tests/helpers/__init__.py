"""Code the tests share: synthetic data, repo copies and commands, tiny trainings, MLflow look-ups,
sweep files, servers, a private Slurm and a headless browser. Fixtures live in tests/conftest.py;
test modules import these, never each other."""
