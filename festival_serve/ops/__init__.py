"""Ops wing: the operator's commands — bring the graph up, local clusters, manifests, ONNX export, validate, check-gpu, annotate."""
