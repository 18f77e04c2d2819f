"""Part swap with Motion-Supervised Co-Part Segmentation: the model wrapper and a batched, source-caching swapper.

Algorithm (see tests/fixtures/cosegmentation/public/README.md): the segmentation module gives soft masks M, part
centres p and 2x2 matrices A for source and driving frame; the deformation
D(z) = M_d[0] z + sum_k M_d[k] (A_s,k A_d,k^-1 (z - p_d,k) + p_s,k) warps the source features; the blend mask m (sum of
the
chosen mask channels, from the driving frame or the warped source) mixes them with the driving frame's features:
F = Enc(d) (1 - m) + warp(Enc(s)) V m, with visibility V = 1 - S_s (1 - S_d); the decoder turns F into the output frame.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from keepr.fileio import atomic_path
from keepr.precision import active_dtype, autocast, check_precision

from .modules import FoldedReconstruction, ReconstructionModule, SegmentationModule

MASK_SOURCES = ("driving", "source")


@contextlib.contextmanager
def no_tf32(device: torch.device):
    """Run CUDA convs/matmuls in full fp32: TF32 would add ~1e-3 errors and break parity with the reference."""
    if device.type != "cuda":
        yield
        return
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, benchmark=torch.backends.cudnn.benchmark,
                                        deterministic=torch.backends.cudnn.deterministic, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def _tensor_key(t: torch.Tensor) -> tuple:
    """Identity of a tensor's current value for caches. Inference tensors (made under torch.inference_mode) have no
    version counter: their key is where they live; CoPartModel.load_state_dict drops the caches explicitly."""
    try:
        version = t._version
    except RuntimeError:
        version = None
    return (t.data_ptr(), version)


@dataclass
class SourceCache:
    """Everything part swap needs from the source image, computed once."""
    image: torch.Tensor         # [1,3,H,W]
    features: torch.Tensor      # [1,C,h,w] reconstruction-module encoding, in the compute dtype it was made in
    seg: dict                   # segmentation-module outputs, batch 1 (fp32)
    parts: torch.Tensor         # [1,1,hs,ws] sum of part channels 1..K (for the visibility map)

    def features_as(self, dtype: torch.dtype, memory_format: torch.memory_format) -> torch.Tensor:
        """The features in ``dtype`` / ``memory_format`` (converted once and kept, so a swap at another precision
        than the preparation does not convert them again for every batch)."""
        f = self.features
        if f.dtype != dtype or not f.is_contiguous(memory_format=memory_format):
            f = f.to(dtype).contiguous(memory_format=memory_format)
            self.features = f
        return f


class CoPartModel(nn.Module):
    """Segmentation module + reconstruction module of one official config; ``state_dict`` keys are
    ``segmentation_module.*`` and ``reconstruction_module.*`` (the logger checkpoint layout)."""

    def __init__(self,
        model_params,               # The config's ``model_params`` dict (common / segmentation / reconstruction).
        img_size        = 256,      # Crop size the model expects (config dataset_params.image_shape[0]).
    ):
        super().__init__()
        common = dict(model_params["common_params"])
        self.model_params = copy.deepcopy(dict(model_params))
        self.img_size = int(img_size)
        self.num_segments = int(common["num_segments"])
        self.segmentation_module = SegmentationModule(**model_params["segmentation_module_params"], **common)
        self.reconstruction_module = ReconstructionModule(**model_params["reconstruction_module_params"], **common)
        self.batch_invariant = True  # See segment().
        self.fold_generator = True   # Run encode/decode through FoldedReconstruction (see generator()).
        self.channels_last = None    # Reconstruction activations NHWC: None = auto (CPU, or reduced precision).
        self._folded = {}
        self.eval()

    def load_state_dict(self, *args, **kwargs):
        self._folded = {}  # Inference tensors have no version counter: drop the folded forms explicitly.
        return super().load_state_dict(*args, **kwargs)

    def memory_format(self, dtype: torch.dtype = torch.float32) -> torch.memory_format:
        """Activation layout of the reconstruction path: channels_last on CPU (oneDNN's fast layout, 1.2x in fp32,
        what makes bf16 pay) and for reduced precision on GPUs; NCHW for fp32 on GPUs."""
        cl = self.channels_last
        if cl is None:
            cl = self.device.type == "cpu" or dtype != torch.float32
        return torch.channels_last if cl else torch.contiguous_format

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- pieces --------------------------------------------------------------

    def segment(self, x: torch.Tensor) -> dict:
        """Images [N,3,H,W] in [0,1] -> dict ``segmentation`` [N,K+1,hs,ws], ``shift`` [N,K,2], ``affine`` [N,K,2,2].

        With ``batch_invariant`` (default) frames go through one at a time: conv libraries pick different kernels
        and blockings per batch size at the small segmentation resolutions, and the masks steer the warp, so one-ulp
        changes there reached 3e-5 in the output. This module is ~2% of the FLOPs at 256x256 (its deep 4x4..16x16
        levels are weight-bound anyway); the reconstruction module, ~98%, runs batched.
        """
        if not self.batch_invariant or x.shape[0] == 1:
            return self.segmentation_module(x)
        outs = [self.segmentation_module(x[i:i + 1]) for i in range(x.shape[0])]
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}

    def generator(self, dtype: torch.dtype | None = None):
        """Module used for encode/decode: the reconstruction module itself, or (``fold_generator``) its folded
        inference form computing in ``dtype`` (default: the weights' dtype), rebuilt whenever a weight, the device
        or the dtype changed."""
        rec = self.reconstruction_module
        if not self.fold_generator:
            return rec
        tensors = list(rec.state_dict().values())
        dtype = tensors[0].dtype if dtype is None else dtype
        fmt = self.memory_format(dtype)
        key = (tuple(_tensor_key(t) for t in tensors), tensors[0].device)
        slot = self._folded.get((dtype, fmt))
        if slot is None or slot[0] != key:
            if slot is not None or len(self._folded) > 2:
                self._folded = {k: v for k, v in self._folded.items() if v[0] == key}
            slot = (key, FoldedReconstruction(rec, dtype=dtype, memory_format=fmt))
            self._folded[(dtype, fmt)] = slot
        return slot[1]

    def _compute_dtype(self) -> torch.dtype:
        """The reconstruction path's dtype: autocast's when it is on for this device (see keepr.precision), else
        fp32. Segmentation, motion and warps always run in fp32 (they steer the warp; 3% of the FLOPs)."""
        if not self.fold_generator:
            return torch.float32
        return active_dtype(self.device.type)

    @torch.no_grad()
    def prepare_source(self, source: torch.Tensor) -> SourceCache:
        """Encode and segment the source once."""
        if source.ndim != 4 or source.shape[0] != 1 or source.shape[1] != 3:
            raise ValueError(f"source: expected [1,3,H,W], got {list(source.shape)}")
        source = source.to(self.device, torch.float32)
        dt = self._compute_dtype()
        with no_tf32(source.device), torch.autocast(source.device.type, enabled=False):
            seg = self.segment(source)
            feats = self.generator(dt).encode(source)
        parts = seg["segmentation"][:, 1:].sum(dim=1, keepdim=True)
        return SourceCache(image=source, features=feats, seg=seg, parts=parts)

    def _check_swap_index(self, swap_index: Sequence[int]) -> list[int]:
        idx = [int(i) for i in swap_index]
        if not idx or any(i < 0 or i > self.num_segments for i in idx):
            raise ValueError(f"swap_index must be channel numbers in 1..{self.num_segments} (0 = background), "
                             f"got {list(swap_index)}")
        return idx

    @torch.no_grad()
    def swap_batch(self, cache: SourceCache, driving: torch.Tensor, swap_index: Sequence[int], hard: bool = False,
                   mask_from: str = "driving", align_corners: bool = True) -> dict:
        """Part swap of a batch of driving frames [B,3,H,W] against a cached source.

        Returns ``prediction`` [B,3,H,W] and the intermediates ``seg`` (driving), ``deformation`` [B,h,w,2],
        ``visibility`` [B,1,h,w] (or None), ``blend_mask`` [B,1,h,w] (the mask used in the blend).
        """
        if mask_from not in MASK_SOURCES:
            raise ValueError(f"mask_from must be one of {MASK_SOURCES}, got {mask_from!r}")
        idx = self._check_swap_index(swap_index)
        if driving.ndim != 4 or driving.shape[1] != 3 or driving.shape[2:] != cache.image.shape[2:]:
            raise ValueError(f"driving: expected [T,3,{cache.image.shape[2]},{cache.image.shape[3]}], "
                             f"got {list(driving.shape)}")
        rec = self.reconstruction_module
        driving = driving.to(self.device, torch.float32)
        dt = self._compute_dtype()
        with no_tf32(driving.device), torch.autocast(driving.device.type, enabled=False):
            seg_d = self.segment(driving)
            gen = self.generator(dt)
            enc_d = gen.encode(driving)
            deformation = rec.deformation(seg_d, cache.seg)                        # [B,hs,ws,2]
            src = cache.features_as(enc_d.dtype, self.memory_format(dt))
            if src.dtype != torch.float32:
                # grid_sample needs grid and input in one dtype; a bf16 grid would put the sampling points up to
                # 1/4 pixel off at 64x64, so the warp reads the (small, batch-1) source features in fp32.
                src = src.float()
            warped = rec.deform_input(src, deformation, align_corners)            # [B,C,h,w]

            visibility = None
            if rec.estimate_visibility:
                parts_d = seg_d["segmentation"][:, 1:].sum(dim=1, keepdim=True)
                visibility = 1 - cache.parts * (1 - parts_d)
                if visibility.shape[2:] != warped.shape[2:]:
                    visibility = F.interpolate(visibility, size=warped.shape[2:], mode="bilinear", align_corners=False)
                warped = warped * visibility

            masks = cache.seg["segmentation"] if mask_from == "source" else seg_d["segmentation"]
            blend = masks[:, idx].sum(dim=1, keepdim=True)
            if hard:
                blend = (blend > 0.5).to(blend.dtype)
            if mask_from == "source":
                blend = rec.deform_input(blend, deformation, align_corners)
            elif blend.shape[2:] != warped.shape[2:]:
                raise ValueError("blend mask and features differ in size; only blend_scale=1 configs are supported")

            if enc_d.dtype != torch.float32:
                blend_dt, warped = blend.to(enc_d.dtype), warped.to(enc_d.dtype)
                feats = torch.addcmul(enc_d * (1 - blend_dt), warped, blend_dt)
            else:
                feats = enc_d * (1 - blend) + warped * blend
            prediction = gen.decode(feats).float()
        return {"prediction": prediction, "seg": seg_d, "deformation": deformation, "visibility": visibility,
                "blend_mask": blend}

    # -- user entry points ---------------------------------------------------

    @torch.no_grad()
    def part_swap(self, source: torch.Tensor, driving: torch.Tensor, swap_index: Sequence[int], hard: bool = False,
                  mask_from: str = "driving", align_corners: bool = True, batch_size: int = 8,
                  precision=None) -> torch.Tensor:
        """Swap the ``swap_index`` parts of ``source`` [1,3,H,W] into every frame of ``driving`` [T,3,H,W] (floats in
        [0,1]); returns [T,3,H,W] fp32. ``align_corners=True`` is canonical (the authors' torch 1.0 behaviour).
        ``precision``: '32', 'bf16', '16' (see keepr.precision), None = the caller's autocast (fp32 without)."""
        return PartSwapper(self, source, swap_index, hard=hard, mask_from=mask_from, align_corners=align_corners,
                           batch_size=batch_size, precision=precision)(driving)

    def save(self, path) -> None:
        """Write a checkpoint in the authors' logger layout (plain tensors; loadable with weights_only=True)."""

        ckpt = {"segmentation_module": {k: v.detach().cpu().clone()
                                        for k, v in self.segmentation_module.state_dict().items()},
                "reconstruction_module": {k: v.detach().cpu().clone()
                                          for k, v in self.reconstruction_module.state_dict().items()},
                "epoch": 0}
        with atomic_path(path) as tmp:
            torch.save(ckpt, tmp)


class PartSwapper:
    """Part swap against one source: the source's features, segmentation and part motion are computed once, driving
    frames go through ``batch_size`` at a time. ``swapper(driving)`` -> [T,3,H,W];
    ``swapper(driving, return_mask=True)`` -> (frames, blend mask [T,1,H,W] bilinearly resized to the image size)."""

    def __init__(self, model: CoPartModel, source: torch.Tensor, swap_index: Sequence[int], hard: bool = False,
                 mask_from: str = "driving", align_corners: bool = True, batch_size: int = 8,
                 precision=None):
        if mask_from not in MASK_SOURCES:
            raise ValueError(f"mask_from must be one of {MASK_SOURCES}, got {mask_from!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.swap_index = model._check_swap_index(swap_index)
        self.hard = bool(hard)
        self.mask_from = mask_from
        self.align_corners = bool(align_corners)
        self.batch_size = int(batch_size)
        # precision None: follow the caller's autocast (keepr.precision.autocast), else run at this one.
        self.precision = None if precision is None else check_precision(precision, model.device)
        with self._precision():
            self.cache = model.prepare_source(source)

    def _precision(self):
        return contextlib.nullcontext() if self.precision is None else autocast(self.model.device, self.precision)

    @torch.no_grad()
    def __call__(self, driving: torch.Tensor, return_mask: bool = False):
        if driving.ndim != 4 or driving.shape[1] != 3:
            raise ValueError(f"driving: expected [T,3,H,W], got {list(driving.shape)}")
        out_device = driving.device
        frames, masks = [], []
        for start in range(0, driving.shape[0], self.batch_size):
            with self._precision():
                res = self.model.swap_batch(self.cache, driving[start:start + self.batch_size], self.swap_index,
                                            hard=self.hard, mask_from=self.mask_from,
                                            align_corners=self.align_corners)
            frames.append(res["prediction"].to(out_device))
            if return_mask:
                m = F.interpolate(res["blend_mask"], size=driving.shape[2:], mode="bilinear", align_corners=False)
                masks.append(m.clamp(0, 1).to(out_device))
        out = torch.cat(frames) if frames else driving.new_zeros(driving.shape)
        if return_mask:
            return out, (torch.cat(masks) if masks else driving.new_zeros((0, 1) + tuple(driving.shape[2:])))
        return out
