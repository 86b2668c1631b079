"""Bag of channels (BoC) pretraining data: each item is one channel, drawn at random, of a multi-channel sample.

A BoC encoder sees single-channel images only, so one encoder serves every channel; at evaluation each channel
is encoded on its own and the per-channel embeddings are concatenated (``engine_features.bag_of_channels``).
"""

import torch


class SingleChannelDataset(torch.utils.data.Dataset):
    """Items (1, H, W) of a (C, H, W) dataset: channel c of sample i, c drawn uniformly with torch's RNG.

    source: the MultiChannelDataset (channel ids and names); items: what the training loader would read
    (``util.data.device_augment.training_items``, e.g. a packed store's window crops), default source.

    The draw uses the process's (or DataLoader worker's) torch RNG, like the random crops, so it follows
    ``--seed``. ``channel_name(c)`` names a drawn channel in the source's vocabulary (``ch<id>`` when the data
    name none); ``channel_ids`` is ``[0]``: the model sees one input plane.
    """

    def __init__(self, source, items=None):
        self.source = source
        self.items = source if items is None else items
        self.source_channel_ids = list(source.channel_ids)
        self.channel_ids = [0]
        self.in_chans = 1
        self.num_channels = 1
        self.channel_names = None
        self.classes = getattr(source, "classes", [])

    def __len__(self):
        return len(self.source)

    def channel_name(self, c: int) -> str:
        """The name of position c among the source's channels read."""
        names = self.source.channel_names
        channel = self.source_channel_ids[c]
        return names[channel] if names and channel < len(names) else f"ch{channel}"

    def draw(self, index: int) -> tuple[torch.Tensor, int, str]:
        """(one channel of sample index (1, H, W), its label, the channel's name)."""
        img, label = self.items[index]
        c = int(torch.randint(img.shape[0], ()))
        return img[c : c + 1], label, self.channel_name(c)

    def __getitem__(self, index):
        img, label, _ = self.draw(index)
        return img, label
