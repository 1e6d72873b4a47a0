"""Uploaded files (datasets, model weights), usable in specs by their `file_…` id."""
