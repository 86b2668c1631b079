"""Errors the user can act on; ``util.cli.run_main`` prints them as one ``ERROR:`` line without a traceback."""


class RunError(RuntimeError):
    """A problem the user can act on (a checkpoint, the output directory, a flag); ``run_main`` prints it as
    ``ERROR: <message>`` and exits with status 1, without a traceback."""


class CheckpointError(RunError):
    """A checkpoint file cannot be read, is not a checkpoint, or needs ``--unsafe_load``."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint does not fit the model; the message lists the mismatched keys and shapes."""


class OutputError(RunError):
    """``--output_dir`` / ``--log_dir`` cannot be written (permissions, not a directory, disk full)."""
