"""Sharing what a run trained (`publish.py`): the published folder (timm's format, the model card,
the run's page), the Hugging Face Hub and a Gradio Space. Imports every layer below it: the run's
files (run), its page and curves (report), the weights (training)."""
