"""Small investigations behind remarks in docs/benchmarks.md."""
