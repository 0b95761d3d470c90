"""Training, evaluation and measurement."""
