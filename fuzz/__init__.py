"""Coverage-guided fuzz harnesses (atheris) for the sans-I/O core; see fuzz/README.md."""
