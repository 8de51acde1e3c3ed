"""Running the book on a SLURM cluster: job scripts per chapter and the cost estimates to read first."""
