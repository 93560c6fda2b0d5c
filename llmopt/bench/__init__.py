"""Benchmark helpers shared by scripts/ (and, later, `llmopt bench`)."""
