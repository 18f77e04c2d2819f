"""Motion-Supervised Co-Part Segmentation (Siarohin et al., CVPR 2020): official part-swap model, loader and swapper."""
from .loader import build_model, load_config, load_cosegmentation, make_tiny_cosegmentation
from .modules import ReconstructionModule, SegmentationModule
from .part_swap import CoPartModel, PartSwapper, SourceCache

__all__ = ["CoPartModel", "PartSwapper", "SourceCache", "SegmentationModule", "ReconstructionModule",
           "load_cosegmentation", "load_config", "build_model", "make_tiny_cosegmentation"]
