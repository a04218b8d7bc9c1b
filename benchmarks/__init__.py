"""Speed, memory and quality benchmarks; ``make bench`` (``python -m benchmarks``) runs them."""
