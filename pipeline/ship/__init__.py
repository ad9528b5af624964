"""The device bundle: one reproducible .tar.gz of the delivered model, the runner and its wheels."""
