"""The CUDA backend of ``torch.ops.tq``."""
