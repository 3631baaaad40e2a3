"""The pages people read: a run's page (curves, results, what it learned), and an index of runs.
Imports every layer below (run, training, data, shared); nothing imports it but the scripts."""
