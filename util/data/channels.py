"""Channel names (``--channel_names``, CSV columns or channels.txt) and the channels a dataset reads (``--channels``).

Every dataset names its channels: ``--channel_names`` first, then the CSV's channel column headers, then
``channels.txt`` (one name per line) in the data root; with none of them the channels get positional names
``ch0, ch1, ...`` (said once per process). ``--channels`` keeps the channels it lists, in that order, at read time,
by name (``DNA,Mito``) or by position in the files (``0,2,4``).
"""

import logging

from util.data.config import DataConfig
from util.data.errors import DatasetError
from util.data.layouts import describe_files

logger = logging.getLogger(__name__)

CHANNEL_NAMES_FILENAME = "channels.txt"
_noticed = set()


def positional_names(num_channels: int) -> list[str]:
    """The names of channels that nothing names: ``ch0 .. ch{C-1}``."""
    return [f"ch{c}" for c in range(num_channels)]


def split_names(value) -> list[str] | None:
    """A "A,B,C" string or a list of names -> a list of stripped names (None for None / "")."""
    if value is None or value == "" or value == []:
        return None
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    return [item.strip() for item in items]


def _checked(names, source, num_channels):
    if len(names) != num_channels:
        raise DatasetError(f"{source} lists {len(names)} channel names but the data have {num_channels} channels")
    if any(not name for name in names) or len(set(names)) != len(names):
        raise DatasetError(f"{source} must list distinct, non-empty channel names; got {names}")
    return names


def read_channel_names(stats_dir, csv_names, num_channels, given=None) -> list[str]:
    """The names of the files' channels: ``given`` (``--channel_names``), the CSV's channel columns, channels.txt in
    stats_dir, else positional names (with a notice, once per data root)."""
    if split_names(given) is not None:
        return _checked(split_names(given), f"--channel_names {given!r}", num_channels)
    if csv_names is not None:
        return _checked(list(csv_names), f"the CSV index in {stats_dir}", num_channels)
    names_file = stats_dir / CHANNEL_NAMES_FILENAME
    if names_file.is_file():
        names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        return _checked(names, str(names_file), num_channels)
    if str(stats_dir) not in _noticed:
        _noticed.add(str(stats_dir))
        logger.warning(
            "%s: no %s, CSV channel columns or --channel_names, so its %d channels get positional names %s; a "
            "checkpoint maps them by position",
            *(stats_dir, CHANNEL_NAMES_FILENAME, num_channels, ",".join(positional_names(num_channels))),
        )
    return positional_names(num_channels)


def parse_channels(value, names=None):
    """--channels as None (all), a "0,2,4" / "DNA,Mito" string or a list -> list of distinct file positions or
    None. A token is a channel name when ``names`` holds it, else a position."""
    tokens = split_names(value)
    if tokens is None:
        return None
    index = {name: c for c, name in enumerate(names or [])}
    ids = []
    for token in tokens:
        if token in index:
            ids.append(index[token])
            continue
        try:
            ids.append(int(token))
        except ValueError:
            known = f"; the data's channels are {','.join(names)}" if names else ""
            raise DatasetError(f"--channels {value!r}: {token!r} is neither a channel name nor an id{known}") from None
    if min(ids) < 0 or len(set(ids)) != len(ids):
        raise DatasetError(f"--channels {value!r} must list distinct channels (names or ids >= 0)")
    return ids


def select_channel_ids(config: DataConfig, num_channels: int, example, names=None) -> list:
    """The file positions of the channels to read (``--channels`` by name or id, default all), checked against
    ``--in_chans``; ``example`` is a sample's file(s), named in the error; ``names``: the files' channel names."""
    ids = parse_channels(config.channels, names)
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
