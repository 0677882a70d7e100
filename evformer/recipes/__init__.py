"""Training recipes: one entry point per dataset (``python -m evformer.recipes.<name>``)."""
