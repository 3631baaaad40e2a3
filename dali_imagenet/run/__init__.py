"""The run around the step: checkpoints, resume, the run folder, its outputs and their S3 upload,
the spot notice, stop requests, exit codes and metrics. Imports training, data and the shared
modules; never the report (train.py hands the report writer in)."""
