"""aidc model server: Open Inference Protocol v2 over HTTP for aidc checkpoints."""

__version__ = "0.1.0"
