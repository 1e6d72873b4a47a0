"""Torch-free pieces both the API and the workers need: settings, ids, the job spec, the broker, the artifact store."""
