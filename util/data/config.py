"""DataConfig: every flag the data layer reads, with its default defined once; built from an args namespace."""

from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class DataConfig:
    """The data and reading flags (``util.cli.add_common_args``, fine-tuning's augmentation flags), as given.

    Values are kept as the flags hold them (``channels`` a "0,2,4" / "DNA,Mito" string or a list, ``channel_names``
    "A,B,C", ``data_path`` a string or, for several sources, a list, ``mean``/``std`` lists or
    "1,2,3" strings), so errors quote them as the user wrote them; the data layer parses and checks them.
    """

    data_path: str | None = None
    input_size: int = 224
    in_chans: int | None = None
    channels: str | list | None = None
    channel_names: str | list | None = None
    mean: str | list | None = None
    std: str | list | None = None
    channel_stats: str | None = None
    scale: list | None = None
    hflip: float = 0.5
    vflip: bool = False
    allow_mixed_sizes: bool = False
    skip_bad_samples: bool = False
    channel_axis: str | None = None
    nan_fill: float | None = None
    metadata_columns: str | list | None = None
    aa: str | None = None
    color_jitter: float | None = None
    reprob: float = 0.0
    remode: str = "pixel"
    recount: int = 1

    @classmethod
    def from_args(cls, args) -> "DataConfig":
        """The config of an argparse namespace (or any object): each field from ``args`` when it has the attribute,
        else the default above; a DataConfig is returned as it is."""
        if isinstance(args, cls):
            return args
        return cls(**{f.name: getattr(args, f.name, f.default) for f in fields(cls)})

    def reading_kwargs(self) -> dict:
        """``MultiChannelDataset`` keywords of the reading flags --skip_bad_samples, --channel_axis and --nan_fill."""
        return dict(skip_bad_samples=self.skip_bad_samples, channel_axis=self.channel_axis, nan_fill=self.nan_fill)

    def for_source(self, data_path: str, channel_stats: str | None = None) -> "DataConfig":
        """This config for one source of a multi-source run: its own path and (maybe) statistics file."""
        return replace(self, data_path=data_path, channel_stats=channel_stats or self.channel_stats)
