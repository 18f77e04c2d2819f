"""KEEP:R networks: StyleGAN2 generator, encoder, co-part segmentation."""
