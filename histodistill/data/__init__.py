"""Real patches for networks: streamed from patch stores by zarr chunk (never a whole split in
memory) and normalised with the dataset's channel statistics."""

from histodistill.data.real import RealData, Stats
from histodistill.data.stream import (ClassSampler, channel_stats, iterate, read_rows,
                                      record_channel_stats)

__all__ = ["ClassSampler", "RealData", "Stats", "channel_stats", "iterate", "read_rows",
           "record_channel_stats"]
