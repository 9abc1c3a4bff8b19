"""A sample lab, generated and advanced in training steps, for ``runicorn demo``, the
tests and the benchmarks."""
