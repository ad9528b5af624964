"""edgepipe host pipeline: train, quantize, convert, evaluate, benchmark, report, bundle."""
import os

# TensorFlow's C++ start-up chatter (CPU feature hints, a failed CUDA probe on GPU-less machines)
# buries the build's own output; users can still ask for it with TF_CPP_MIN_LOG_LEVEL=0.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

__version__ = "0.1.0"
