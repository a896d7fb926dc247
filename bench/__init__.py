"""Accuracy and speed benchmarks of lightning-uda; run them from the project root with ``python -m bench.run``."""
