"""Frozen-feature evaluation protocols on an ``extract_features.py`` .npz (``evaluate_features.py``).

featureset: the .npz and its metadata columns; nearest: 1-NN classification and CHAMMI-style tasks; profiling:
well aggregation, per-plate normalisation and mAP (copairs); robustness: accuracy against the number of channels;
report: Markdown tables and the embedding scatter.
"""
