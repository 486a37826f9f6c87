"""One run: the recipe (train), the loop, resume state, the run folder, logging, sweeps, data-parallel processes."""
