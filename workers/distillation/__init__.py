"""Building blocks of the `distill` method: soft-target and hint losses, teachers and their cached logits, student
sizing, multi-teacher balancing, reports, and dataset distillation (synthetic sets, matching, fresh-model checks)."""
