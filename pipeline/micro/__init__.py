"""TensorFlow Lite Micro export: lean conversion, arena measurement, C sources, the board fit table."""
