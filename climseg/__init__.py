"""climseg: DeepLabv3+ segmentation of tropical cyclones and atmospheric rivers in CAM5 output."""

__version__ = "0.1.0"
