"""The serving engine around the model: host-side preparation, jitted executables per phase, the
batching scheduler and its worker thread, and `inference.AsyncPi05Inference` that the server holds."""
