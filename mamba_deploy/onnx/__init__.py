"""ONNX artifact: the graph contract (contract.py), the exporter and the manifest."""
