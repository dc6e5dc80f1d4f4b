"""mmdemo: try multimodal models in a browser and turn what people see into labeled data."""

__version__ = "0.1.0"
