"""Segmentation models; `build_model(**config["model"])` is the entry point."""

from climseg.model.deeplab import MODELS, DeepLabV3Plus, build_model

__all__ = ["MODELS", "DeepLabV3Plus", "build_model"]
