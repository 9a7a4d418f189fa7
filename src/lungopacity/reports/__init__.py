"""Evaluation reports: figures (matplotlib, Agg backend, no display needed) and Markdown pages.

:mod:`.plots` holds the figure helpers every report shares (ROC curves, confusion matrix,
saving a figure without pyplot); :mod:`.classification` writes the classifier's report
(``report.md`` with its PNGs) from the metrics that :mod:`lungopacity.engine.evaluate`
computes.
"""
