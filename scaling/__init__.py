"""scaling: a measured multi-GPU scaling study of TensorFlow, PyTorch, Lightning and Horovod."""

__version__ = "0.1.0"
