"""Data layer for multi-channel images: files on disk -> (C, H, W) float tensors + label, per channel normalised.

Data flow of a dataset build (``builders.build_dataset`` / ``build_pretrain_dataset``, from a ``config.DataConfig``):
``layouts`` lists the samples of ``--data_path`` -> ``validate`` reads every file's header (``readers``) and checks
that samples agree -> ``channels`` picks the channel ids and names -> ``stats`` resolves the per-channel mean/std
-> ``transforms`` builds the crop/flip/normalise pipeline -> ``dataset.MultiChannelDataset`` reads pixels
(``readers``) per item. ``python -m util.data.stats`` writes ``channel_stats.json``; ``errors`` holds the
``DatasetError`` family that ``util.cli.run_main`` prints as one ``ERROR:`` line.
"""
