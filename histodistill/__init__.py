"""histodistill: distil histopathology whole-slide-image cohorts into small synthetic patch sets."""

__version__ = "0.1.0"
