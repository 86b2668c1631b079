"""The channel vocabulary: the channel names of a model's embedding rows, saved with every checkpoint, and the
mapping of a dataset's channels onto those rows by name.

A checkpoint holds ``channel_names`` (one name per channel-embedding row, in row order) and ``channel_stats``
(``{'mean': [...], 'std': [...]}``, raw units, one value or None per name) as plain lists. A checkpoint made before
them, or a published MAE file, gets positional names ``ch0 .. ch{R-1}`` and maps a dataset's channels by their
position in the files (said in the log).
"""

import logging

from util.data.channels import positional_names, split_names
from util.data.errors import DatasetError

logger = logging.getLogger(__name__)

VOCABULARY_KEYS = ("channel_names", "channel_stats")
"""The checkpoint entries of the vocabulary."""


class UnknownChannelError(DatasetError):
    """A dataset channel that the checkpoint's vocabulary does not hold."""


def is_positional(names) -> bool:
    return list(names) == positional_names(len(names))


def vocabulary_record(names, datasets) -> dict:
    """The checkpoint entries of vocabulary ``names``: each name's mean/std from the datasets that read it (the
    first that does; None for a name no dataset reads)."""
    mean, std = {}, {}
    for dataset in datasets:
        for name, m, s in zip(dataset.read_names, dataset.mean, dataset.std):
            mean.setdefault(name, float(m))
            std.setdefault(name, float(s))
    return {
        "channel_names": list(names),
        "channel_stats": {"mean": [mean.get(n) for n in names], "std": [std.get(n) for n in names]},
    }


def checkpoint_vocabulary(checkpoint: dict, num_rows: int | None, source: str) -> list[str]:
    """The channel names of a checkpoint's embedding rows; positional names (logged) for a checkpoint without them.

    num_rows: the rows of its channel embedding (None for a whole-patch model, whose planes are then counted by the
    caller). A vocabulary whose length differs from the rows raises ``DatasetError``.
    """
    names = checkpoint.get("channel_names") if isinstance(checkpoint, dict) else None
    if names is None:
        if num_rows is not None:
            logger.warning("%s records no channel names: its %d channels are taken by position", source, num_rows)
        return positional_names(num_rows or 0)
    names = [str(n) for n in names]
    if num_rows is not None and len(names) != num_rows:
        raise DatasetError(f"{source} names {len(names)} channels but its channel embedding has {num_rows} rows")
    return names


def parse_new_channels(value) -> list[str] | bool:
    """``--new_channels``: None -> []; 'all' -> True (every unknown name); 'A,B' -> those names."""
    if value is None:
        return []
    if str(value).strip().lower() == "all":
        return True
    return split_names(value) or []


def map_to_vocabulary(read_names, file_ids, vocabulary, new_channels=(), source="the checkpoint", by_position=True):
    """(embedding rows of the channels read, the vocabulary grown by the new channels).

    read_names / file_ids: the dataset's channels read, by name and by position in the files. vocabulary: the
    checkpoint's names. With ``by_position`` a positional vocabulary, or data without channel names, map by position
    (with a warning); without it (a vocabulary made for the data) every channel maps by name. A name the vocabulary
    lacks gets a new row at its end when ``new_channels`` is True or names it, else raises ``UnknownChannelError``
    naming it and the known names.
    """
    vocabulary = list(vocabulary)
    unnamed = list(read_names) == [f"ch{c}" for c in file_ids]
    if by_position and (is_positional(vocabulary) or unnamed):
        if is_positional(vocabulary) != unnamed and vocabulary:
            logger.warning(
                "%s: channels %s are mapped by file position onto the rows of %s (names %s): one side names no "
                "channels",
                *(source, ",".join(read_names), source, ",".join(vocabulary)),
            )
        grown = vocabulary + positional_names(max(file_ids, default=-1) + 1)[len(vocabulary) :]
        unknown = [name for c, name in zip(file_ids, read_names) if c >= len(vocabulary)]
        _check_new(unknown, new_channels, vocabulary, source)
        return list(file_ids), grown
    row = {name: i for i, name in enumerate(vocabulary)}
    unknown = [name for name in read_names if name not in row]
    _check_new(unknown, new_channels, vocabulary, source)
    for name in unknown:
        row[name] = len(vocabulary)
        vocabulary.append(name)
    if unknown:
        logger.warning("new channels %s get fresh embedding rows %s", unknown, [row[n] for n in unknown])
    return [row[name] for name in read_names], vocabulary


def _check_new(unknown, new_channels, vocabulary, source):
    allowed = new_channels is True or all(name in new_channels for name in unknown)
    if unknown and not allowed:
        raise UnknownChannelError(
            f"channel {unknown[0]!r} (of {','.join(unknown)}) is not one of the channels {source} knows: "
            f"{','.join(vocabulary) or 'none'}. Read only known channels (--channels), or add it as a new channel "
            f"with a fresh embedding row: --new_channels {','.join(unknown)}"
        )


def assign_vocabulary(datasets, vocabulary, new_channels=(), source="the checkpoint", by_position=True) -> list[str]:
    """Set each dataset's ``embed_ids`` (the rows of the channels it reads) from ``vocabulary``; returns the
    vocabulary grown by the new channels (``map_to_vocabulary``)."""
    for dataset in datasets:
        dataset.embed_ids, vocabulary = map_to_vocabulary(
            dataset.read_names, dataset.channel_ids, vocabulary, new_channels, source, by_position
        )
    return vocabulary


def union_vocabulary(datasets, given=None) -> list[str]:
    """A vocabulary for training from scratch: ``given`` names, else every dataset's channel names in order of first
    appearance (all of a dataset's file channels, so a later run may read the ones this one left out)."""
    if split_names(given):
        return split_names(given)
    names = []
    for dataset in datasets:
        names += [n for n in dataset.channel_names if n not in names]
    return names


def check_fixed_order(dataset, vocabulary, model: str, source: str):
    """A whole-patch model (MAE / ViT) takes its planes in one fixed order: with a vocabulary that names real
    channels, data that name theirs must read exactly those, in that order (``DatasetError`` naming the
    ``--channels`` to pass); unnamed data take the planes as they come."""
    read_names = dataset.read_names
    named = not is_positional(dataset.channel_names)
    if named and vocabulary and not is_positional(vocabulary) and list(read_names) != list(vocabulary):
        raise DatasetError(
            f"{model} takes its input planes in a fixed order: {source} was trained on channels "
            f"{','.join(vocabulary)}, the data read {','.join(read_names)}; pass --channels {','.join(vocabulary)}"
        )
