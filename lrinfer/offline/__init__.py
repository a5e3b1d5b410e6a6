"""Offline compression: calibration, the four stages (selection, allocation, solvers,
refinement), the compression loop, resume, memory plans, recipes and the recipe search."""
