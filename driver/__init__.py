"""The run driver: `pag train` (orchestrates samplers, reward workers, the replay buffer and the learner on Ray), its report, and `pag adapt`."""
