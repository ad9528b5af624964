"""What a variant costs and buys: accuracy and latency, every inference through device/core.py."""
