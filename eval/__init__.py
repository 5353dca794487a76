"""`pag eval`: the paper's evaluation protocol — every method in one harness, rendered and scored by
the reward workers' code, cached, and reported as the paper's table (see README "Evaluation")."""
