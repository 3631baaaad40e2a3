"""The training step and what it is built from: the networks (ours and timm's: `archs`), precision,
mixing, EMA, the schedule, the recipe, initial weights (`--init`), evaluation, inference, Grad-CAM
and reading saved weights. Imports the data layer and the shared modules; never the run or the
report."""
