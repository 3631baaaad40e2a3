"""A trained model put to use: loaded with the validation preprocessing it was scored with
(`predictor`), its Grad-CAM heat maps, and the final validation's per-image predictions that the
run's page reads. Imports the run layer (reading checkpoints and published folders), training and
below; never the report or sharing."""
