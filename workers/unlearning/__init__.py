"""The unlearning family's building blocks: forget-set resolution, training from scratch, the algorithms' loops,
the dmm datamodel, models trained in parallel processes, and the evaluation (accuracies, MIA, KLoM)."""
