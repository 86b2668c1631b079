"""The command-line parser of every entry point and tool: one ``ERROR:`` line for a bad flag, numeric limits checked
at parse time, defaults shown in ``--help``.

``ArgumentParser`` is ``argparse.ArgumentParser`` with three changes: a parse error (unknown flag, invalid choice,
not a number) ends with ``ERROR: <message>`` on stderr and status 1, as ``util.cli.run_main`` ends a run, instead of
argparse's usage text and status 2; after parsing, every flag named in ``LIMITS`` (or in the parser's own
``limits``) is checked against its range, the error naming the flag and its value; ``--help`` appends each flag's
default (``HelpFormatter``).
"""

import argparse
import copy
import math
import re
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Limit:
    """The values a numeric flag takes: ``low`` <= value <= ``high`` (a bound is left out when None, excluded when
    ``low_open`` / ``high_open``), always finite; ``ordered``: a flag of several values lists them in ascending
    order (e.g. ``--scale MIN MAX``)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    ordered: bool = False

    def holds(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return "a finite number"


AT_LEAST_1, AT_LEAST_0, POSITIVE = Limit(1), Limit(0), Limit(0, low_open=True)
PROBABILITY = Limit(0, 1)

LIMITS = {
    # sizes and counts
    "batch_size": AT_LEAST_1,
    "epochs": AT_LEAST_1,
    "accum_iter": AT_LEAST_1,
    "input_size": AT_LEAST_1,
    "patch_size": AT_LEAST_1,
    "in_chans": AT_LEAST_1,
    "nb_classes": AT_LEAST_1,
    "num_workers": AT_LEAST_0,
    "print_freq": AT_LEAST_1,
    "save_every": AT_LEAST_0,
    "start_epoch": AT_LEAST_0,
    "warmup_epochs": AT_LEAST_0,
    "vis_every": AT_LEAST_0,
    "vis_n": AT_LEAST_1,
    "seed": Limit(0, 2**32 - 1),
    "world_size": AT_LEAST_1,
    "n": AT_LEAST_1,
    "knn_k": AT_LEAST_0,
    "max_samples": AT_LEAST_1,
    "recount": AT_LEAST_1,
    # optimisation
    "lr": POSITIVE,
    "blr": POSITIVE,
    "min_lr": AT_LEAST_0,
    "weight_decay": AT_LEAST_0,
    "clip_grad": POSITIVE,
    "layer_decay": Limit(0, 1, low_open=True),
    "drop_path": Limit(0, 1, high_open=True),
    "smoothing": Limit(0, 1, high_open=True),
    # data and augmentation
    "hflip": PROBABILITY,
    "scale": Limit(0, 1, low_open=True, ordered=True),
    "color_jitter": AT_LEAST_0,
    "reprob": PROBABILITY,
    "mixup": AT_LEAST_0,
    "cutmix": AT_LEAST_0,
    "cutmix_minmax": Limit(0, 1, ordered=True),
    "mixup_prob": PROBABILITY,
    "mixup_switch_prob": PROBABILITY,
    "nan_fill": Limit(),
    "decode_ratio": Limit(0, 1, low_open=True),
    "knn_t": POSITIVE,
    # Slurm
    "nodes": AT_LEAST_1,
    "ngpus": AT_LEAST_0,
    "tasks_per_node": AT_LEAST_1,
    "cpus_per_task": AT_LEAST_1,
    "mem_gb": AT_LEAST_0,
    "timeout": AT_LEAST_1,
    "signal_delay_s": AT_LEAST_0,
    "max_num_timeout": AT_LEAST_0,
}
"""The range of every numeric flag, by destination; a flag of the same name means the same in every script (a
parser's own ``limits`` replace an entry where it does not, e.g. visualize.py's ``--scale``). ``--mask_ratio`` of
pretraining is checked with its reasons in ``main_pretrain.check_flags``."""


def _text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def limit_error(option: str, value, limit: Limit) -> str | None:
    """The message for a value of ``option`` outside ``limit`` (None when it holds); lists are checked per item."""
    values = value if isinstance(value, list | tuple) else [value]
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return None
    given = f"{option} {' '.join(map(_text, values))}"
    bad = [v for v in values if not limit.holds(v)]
    if bad:
        return f"{given}: {'each value ' if len(values) > 1 else ''}must be {limit}"
    if limit.ordered and list(values) != sorted(values):
        return f"{given}: the values must be in ascending order (MIN MAX)"
    return None


def regex(value: str) -> str:
    """An argparse ``type``: ``value`` if it compiles as a regular expression."""
    try:
        re.compile(value)
    except re.error as err:
        raise argparse.ArgumentTypeError(f"{value} is not a regular expression: {err}") from err
    return value


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written; each flag's help ends with its default, unless the help already says
    what the default is or there is none to show (None, False, [])."""

    @staticmethod
    def _shows_default(action) -> bool:
        default = action.default
        return bool(action.option_strings) and default not in (None, False, [], argparse.SUPPRESS)

    def _get_help_string(self, action):
        help_text = action.help or ""
        if "default" in help_text.lower() or "%(default)" in help_text or not self._shows_default(action):
            return help_text
        return f"{help_text} (default: %(default)s)"

    def _format_action(self, action):
        if not action.help and self._shows_default(action):
            action = copy.copy(action)
            action.help = "default: %(default)s"
        return super()._format_action(action)


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one ``ERROR:`` line (status 1), whose numeric flags are
    checked against ``LIMITS`` updated with ``limits`` after parsing, and whose help shows defaults."""

    def __init__(self, *args, limits: dict | None = None, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.limits = {**LIMITS, **(limits or {})}

    def error(self, message: str):
        sys.exit(f"ERROR: {message}")

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        for action in self._actions:
            limit = self.limits.get(action.dest)
            value = getattr(namespace, action.dest, None)
            if limit is None or value is None or not action.option_strings:
                continue
            message = limit_error(action.option_strings[0], value, limit)
            if message:
                self.error(message)
        return namespace, extras
