"""MedSegDiff: diffusion-based medical image segmentation (Wu et al., MIDL 2023).

The core is plain PyTorch and knows nothing of federation: the Flower apps in ``client/`` and
``server/`` are thin layers over it.
"""

__version__ = "0.1.0"
