"""Settings of the anonymization pipeline: one dataclass per group, every field with its default and what it does.

``infer.py`` exposes each field as ``--group.field`` (and YAML keys of ``configs/infer/*.yaml``); the web page and
the evaluation build the same ``InferSettings``. :func:`anonymizer.checks.validate_settings` checks them all before
any work starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from keepr.errors import KeeprError

FALLBACKS = ("blur", "mosaic", "blackbox", "none")


@dataclass
class DetectSettings:
    detector: str = "hog"  # dlib detector: 'hog' (fast, frontal) or 'cnn' (slower, more poses)
    upsample: int = 1  # 2x upsamplings before detection (1 finds faces down to ~40 px)
    every: int = 1  # run the detector every k frames; frames between are interpolated
    max_side: int | None = None  # detect on a copy downscaled to this longer side (None = full size)
    min_size: int = 0  # drop detections with a smaller box side (px)


@dataclass
class TrackSettings:
    iou_threshold: float = 0.3  # least box overlap to continue a track
    max_age: int = 25  # frames a track may go undetected and still be continued
    link_distance: float = 1.0  # re-link a track found again within this many box sizes of where it was lost
    link_identity: float | None = 0.6  # link tracks (no overlap in time) whose faces are closer than this dlib
    #                                    distance into one person (None = off)
    min_detections: int = 2  # shorter tracks are false positives (unless the detector ran on fewer frames)
    max_gap: int = 10  # undetected runs up to this long between detections are interpolated
    hold: int = 5  # beyond that, keep the last box this many frames, then stop swapping (the coverage pass decides)
    smooth_radius: int = 2  # centred moving average over 2 * radius + 1 frames


@dataclass
class CoverageSettings:
    detector: str | None = None  # detector of the coverage pass (None = detect.detector)
    upsample: int | None = None  # its upsampling (None = detect.upsample + 1; never less than detect.upsample)
    extend_tracks: bool = True  # tracks reach back (and forward) over the coverage pass's detections of the face
    min_alpha: float = 0.5  # a face is covered by the swap when the paste mask averages at least this over its
    #                         inner box (eyes, nose, mouth)
    identity: bool = True  # compare each anonymized face with the original identity (dlib) and report matches
    identity_every: int = 1  # that comparison on every k-th frame (dlib's descriptor costs ~60 ms a face on CPU)
    margin: float = 0.2  # the fallback acts on the face box grown by this fraction on each side


@dataclass
class CropSettings:
    scale: float = 1.8  # crop side / face box side (co-part models see the whole head)
    shift_y: float = -0.1  # crop centre offset in face box heights (negative = up)


@dataclass
class SwapSettings:
    parts: list[int] = field(default_factory=lambda: [1, 2, 5])  # co-part segments taken from the virtual face
    hard: bool = False  # binarise the part mask inside the model
    mask_from: str = "driving"  # segment the parts on the 'driving' frame or the 'source' virtual face
    batch_size: int = 8  # frames per part-swap batch (memory is bounded by this)
    device: str = "cpu"  # torch device for the models
    precision: str = "32"  # 32 | bf16 (CPUs with AVX-512 BF16 / AMX, recent GPUs) | 16 (GPUs): generator, encoder, swap


@dataclass
class BlendSettings:
    mask: str = "parts"  # 'parts' (the swapped parts' mask) or 'crop' (the whole crop)
    dilate: float = 6.0  # grow the part mask (px at 256)
    blur: float = 6.0  # Gaussian feather (px at 256)
    border: float = 0.06  # fade to 0 over this fraction of the crop side at its edge


@dataclass
class VirtualFaceSettings:
    num_candidates: int = 9  # candidates made and shown in candidates.png
    candidate: int | None = None  # chosen index (None = first that passes the identity guard)
    noise: float = 1.0  # latent noise, in units of W's per-dimension spread
    layers: list[str] = field(default_factory=lambda: ["coarse", "middle"])  # style layers that get the noise
    guard_threshold: float | None = 0.6  # least dlib distance to the target (None = guard off)
    max_redraws: int = 5  # redraws of a candidate that is too close to the target
    skin_match: bool = True  # match the chosen face's skin tone to the target's


@dataclass
class EncodeSettings:
    crf: int = 18  # x264 quality
    preset: str = "medium"  # x264 speed
    audio: str = "copy"  # 'copy' (unchanged where mp4 can hold it, else AAC), 'aac' (re-encode) or 'none'
    threads: int = 2  # x264 threads, fixed so the same input gives the same bytes on any machine (0 = x264 decides)


@dataclass
class ModelPaths:
    generator: str = "weights/ffhq.pkl"
    encoder: str = "weights/encoder_ffhq256.safetensors"
    cosegmentation: str = "weights/vox-10segments.pth.tar"
    cosegmentation_config: str = "configs/cosegmentation/vox-256-10segments.yaml"


GROUPS = {"models": ModelPaths, "detect": DetectSettings, "coverage": CoverageSettings, "track": TrackSettings,
          "crop": CropSettings, "swap": SwapSettings, "blend": BlendSettings, "virtual_face": VirtualFaceSettings,
          "encode": EncodeSettings}


@dataclass
class InferSettings:
    models: ModelPaths = field(default_factory=ModelPaths)
    face: str = "all"  # 'all' (every person), 'largest' or a person index (persons sorted by size x duration)
    fallback: str = "blur"  # applied to faces of chosen persons that the swap does not cover: blur|mosaic|blackbox|none
    strict: bool = False  # a chosen face left uncovered (or a truncated input) is an error (exit 2; output kept)
    seed: int = 0
    detect: DetectSettings = field(default_factory=DetectSettings)
    coverage: CoverageSettings = field(default_factory=CoverageSettings)
    track: TrackSettings = field(default_factory=TrackSettings)
    crop: CropSettings = field(default_factory=CropSettings)
    swap: SwapSettings = field(default_factory=SwapSettings)
    blend: BlendSettings = field(default_factory=BlendSettings)
    virtual_face: VirtualFaceSettings = field(default_factory=VirtualFaceSettings)
    encode: EncodeSettings = field(default_factory=EncodeSettings)
    progress: bool = True  # progress bar on stderr

    @classmethod
    def from_dict(cls, d: dict) -> "InferSettings":
        kw = {}
        for k, v in d.items():
            if k in GROUPS:
                try:
                    kw[k] = GROUPS[k](**(v or {}))
                except TypeError as exc:
                    raise KeeprError(f"settings group {k!r}: {exc}") from None
            elif k in cls.__dataclass_fields__:
                kw[k] = v
            else:
                raise KeeprError(f"unknown setting {k!r}")
        return cls(**kw)

    def coverage_detector(self) -> tuple[str, int]:
        """(detector, upsample) of the coverage pass: at least as sensitive as the tracking pass."""
        c, d = self.coverage, self.detect
        return (c.detector or d.detector, d.upsample + 1 if c.upsample is None else int(c.upsample))


def parse_face(which) -> str | int:
    if isinstance(which, int) or (isinstance(which, str) and which.lstrip("-").isdigit()):
        return int(which)
    if which in ("largest", "all"):
        return which
    raise KeeprError(f"--face must be 'largest', 'all' or a person index, got {which!r}")
