"""dcml: Divide-and-Conquer Metric Learning (Sanakoyeu et al., CVPR 2019 / TPAMI 2021)."""

__version__ = "0.1.0"
