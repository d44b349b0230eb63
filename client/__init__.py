"""The hospital side of the federation: a Flower ClientApp over ``medsegdiff_core``."""
