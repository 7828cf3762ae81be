"""The run machinery below the components: the command line, the runner and its trainers, resume and checkpoints,
output files and locks, stopping, sample grids and figures, the non-finite guard, several processes, the learning
evolution and the comparison of configs over seeds."""
