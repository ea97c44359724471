"""The Linux CPU speed path: an optimised BLAS and NumPy kernels, fenced off from Metal."""
