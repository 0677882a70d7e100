"""Plotting helpers shared by recipes and notebooks."""
