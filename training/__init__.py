"""LightningModules (one per task) and their callbacks."""
