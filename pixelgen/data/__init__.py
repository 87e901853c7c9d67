"""Datasets, input pipelines and the colour palette."""
