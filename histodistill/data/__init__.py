"""Real patches for networks: patch stores (``store``), ingest of pre-tiled datasets
(``ingest``), streaming by zarr chunk (``stream``: never a whole split in memory) and the
training view with the dataset's channel statistics (``real``).

Import the submodule you need: the workflow imports the light ones (``ingest``, ``store``)
while it builds the DAG, where importing torch would cost every ``snakemake`` call a second."""
