"""Pruning's building blocks: weight masks and sparsity schedules (unstructured), channel removal with Torch-Pruning
(structured), the fine-tuning loss, before/after measurement, and the stage loop every pruning recipe runs."""
