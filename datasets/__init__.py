"""Datasets and LightningDataModules of KEEP:R."""
