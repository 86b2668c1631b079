"""Errors of the data layer: bad data or a bad data flag, raised while a dataset is built or read."""


class DatasetError(ValueError):
    """A problem with the data or a data flag, raised while the dataset is built."""


class MissingPathError(DatasetError, FileNotFoundError):
    """A path named by a flag or a CSV row does not exist."""


class CorruptFileError(DatasetError):
    """A file cannot be decoded or is truncated."""


class NonFinitePixelsError(CorruptFileError):
    """A file holds NaN or infinite pixels and no ``--nan_fill`` value replaces them."""
