"""A trained model put to use: loaded with the validation preprocessing it was scored with
(`predictor`), its Grad-CAM heat maps, the final validation's per-image predictions that the
run's page reads, and what a server needs besides HTTP: uploads read safely (`uploads`), dynamic
batching (`batcher`), which weights answered (`identity`). Imports the run layer (reading
checkpoints and published folders), training and below; never the report or sharing."""
