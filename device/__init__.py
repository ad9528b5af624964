"""edgepipe device runner: the one TFLite inference core (no TensorFlow, no pipeline imports)."""
