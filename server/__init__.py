"""The coordinating side of the federation: a Flower ServerApp over ``medsegdiff_core``."""
