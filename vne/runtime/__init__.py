"""Running VNE: the stream pipeline, the ONNX model session, the quality guard, the study store, servers."""
