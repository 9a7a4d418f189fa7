"""Prepared arrays, torch datasets and augmentation."""
