"""Prediction for people and services: the model bundle, the predictor, Grad-CAM, ONNX.

The web service imports only this package (and ``lungopacity.constants``).
"""

from lungopacity.inference.bundle import BundleError
from lungopacity.inference.predictor import Predictor
from lungopacity.inference.schemas import Box, Prediction, Reading
from lungopacity.io.errors import ImageReadError as InputError
from lungopacity.io.images import sniff_format

__all__ = ["Box", "BundleError", "InputError", "Prediction", "Predictor", "Reading", "sniff_format"]
