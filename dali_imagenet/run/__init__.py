"""The run around the step: checkpoints (written and read back), a run's starting weights
(`--init`), the published format (timm's) and what a Hub call failed on, resume, the run folder,
its outputs and their S3 upload, the spot notice, stop requests, exit codes, the run's log and its
cost. Imports training, data and the shared modules; never inference or the report (train.py
hands the report writer in)."""
