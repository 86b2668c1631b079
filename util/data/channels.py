"""Channel names (CSV columns or channels.txt) and the channel ids a dataset reads (``--channels``).

``--channels 0,2,4`` keeps those channel ids, in that order, at read time (CSV: column order).
"""

from util.data.config import DataConfig
from util.data.errors import DatasetError
from util.data.layouts import describe_files

CHANNEL_NAMES_FILENAME = "channels.txt"


def read_channel_names(stats_dir, csv_names, num_channels):
    """Channel names from the CSV's columns, else from channels.txt (one per line) in stats_dir, else None."""
    names_file = stats_dir / CHANNEL_NAMES_FILENAME
    if csv_names is not None or not names_file.is_file():
        return csv_names
    names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
    if len(names) != num_channels:
        raise DatasetError(f"{names_file} lists {len(names)} channel names but the data have {num_channels} channels")
    return names


def parse_channels(value):
    """--channels as None (all), a "0,2,4" string or a list of ints -> list of distinct ids or None."""
    if value is None or value == "":
        return None
    try:
        ids = [int(v) for v in (value.split(",") if isinstance(value, str) else value)]
    except (TypeError, ValueError) as e:
        raise DatasetError(f"--channels {value!r} is not a comma-separated list of channel ids") from e
    if not ids or min(ids) < 0 or len(set(ids)) != len(ids):
        raise DatasetError(f"--channels {value!r} must list distinct channel ids >= 0")
    return ids


def select_channel_ids(config: DataConfig, num_channels: int, example) -> list:
    """The channel ids to read (``--channels``, default all), checked against ``--in_chans``; ``example`` is a
    sample's file(s), named in the error."""
    ids = parse_channels(config.channels)
    if ids is None:
        ids = list(range(num_channels))
    elif max(ids) >= num_channels:
        raise DatasetError(f"--channels {ids} asks for channel {max(ids)} but the data have {num_channels} channels")
    in_chans = config.in_chans
    if in_chans is not None and in_chans != len(ids):
        raise DatasetError(
            f"--in_chans {in_chans} does not match the data: {len(ids)} of {num_channels} channels are used "
            f"({describe_files(example)} has {num_channels})"
        )
    return ids
