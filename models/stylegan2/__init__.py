"""StyleGAN2 generator (pure PyTorch, NVlabs-equal) and its checkpoint loaders."""
from .loaders import load_generator, make_tiny_generator
from .networks import Generator, MappingNetwork, SynthesisNetwork, save_generator

__all__ = ["Generator", "MappingNetwork", "SynthesisNetwork", "load_generator", "make_tiny_generator",
           "save_generator"]
