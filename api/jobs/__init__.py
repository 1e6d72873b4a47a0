"""Jobs: submit, list, get, cancel, and a job's events and metrics."""
