"""Optional integrations with training frameworks (each imports its framework lazily):

- :mod:`commlib.integrations.lightning`: ``CommlibCallback`` for PyTorch Lightning (extra ``lightning``);
- :mod:`commlib.integrations.accelerate`: ``register`` for Hugging Face Accelerate (extra ``accelerate``).
"""
