"""After training: the forward path for predict/evaluate, compress (prune, int8) and export (ONNX)."""
