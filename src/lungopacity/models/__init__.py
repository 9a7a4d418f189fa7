"""Torch modules and their factories: the image classifier, metadata fusion and the opacity detector.

Import the submodules directly (``lungopacity.models.classifier``, ...); this package
module imports nothing so that importing one model never pulls in the others.
"""
