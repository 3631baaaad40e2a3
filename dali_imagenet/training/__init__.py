"""The training step and what it is built from: the networks (ours and timm's: `archs`), precision,
mixing, EMA, the schedule, the recipe, evaluation and the throughput meter. Imports the data layer
and the shared modules; never the run, inference or the report."""
