"""Candidates: latent noise per style-layer group, determinism, identity guard (with real photos), grid."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from anonymizer.candidates import (
    Candidate,
    candidate_grid,
    encode_face,
    estimate_w_spread,
    identity_check,
    layer_mask,
    make_candidates,
    synthesize,
    ws_resolutions,
)
from anonymizer.faces import align_face, detect_faces
from anonymizer.identity import SAME_PERSON_THRESHOLD, FaceRecognizer
from keepr.errors import KeeprError
from keepr.images import load_image
from models.encoder import load_encoder
from models.stylegan2 import load_generator

SPREAD_SAMPLES = 2000  # enough for the tiny generator's spread, fast on 2 cores


@pytest.fixture(scope="module")
def tiny_G(tiny_models):
    return load_generator(tiny_models["generator"])


@pytest.fixture(scope="module")
def tiny_encoder(tiny_models):
    """The untrained tiny encoder, centred on the generator's w_avg, with a perturbed head so that its output
    depends on the image."""
    enc = load_encoder(tiny_models["encoder"], tiny_models["generator"])
    torch.manual_seed(0)
    with torch.no_grad():
        enc.w_avg.copy_(load_generator(tiny_models["generator"]).w_avg)
        torch.nn.init.normal_(enc.head[-1].weight, std=0.05)
    return enc.eval()


@pytest.fixture(scope="module")
def recognizer():
    return FaceRecognizer()


@pytest.fixture(scope="module")
def aligned(media_dir):
    cache = {}

    def _get(name, size=256):
        if (name, size) not in cache:
            sub = "lisa" if name.startswith("lisa") else "london_512"
            img = load_image(media_dir / "photos" / sub / f"{name}.jpg")
            cache[name, size] = align_face(img, detect_faces(img)[0].landmarks, size).image
        return cache[name, size]
    return _get


# ---------------------------------------------------------------------------------------------------------------
# Layers and spread


def test_ws_resolutions_and_groups():
    assert ws_resolutions(10, 64) == [4, 8, 8, 16, 16, 32, 32, 64, 64, 64]
    r = ws_resolutions(18, 1024)
    assert r[:3] == [4, 8, 8] and r[3:7] == [16, 16, 32, 32] and r[-1] == 1024 and len(r) == 18
    assert layer_mask(18, 1024, ["coarse"]).nonzero().flatten().tolist() == [0, 1, 2]
    assert layer_mask(18, 1024, ["middle"]).nonzero().flatten().tolist() == [3, 4, 5, 6]
    assert layer_mask(18, 1024, ["fine"]).nonzero().flatten().tolist() == list(range(7, 18))
    assert layer_mask(14, 256, "all").all()
    with pytest.raises(KeeprError, match="subset"):
        layer_mask(10, 64, ["medium"])
    with pytest.raises(KeeprError, match="num_ws"):
        ws_resolutions(12, 64)


def test_w_spread(tiny_G):
    s = estimate_w_spread(tiny_G, num_samples=SPREAD_SAMPLES)
    assert s.shape == (tiny_G.w_dim,) and torch.all(s > 0)
    assert estimate_w_spread(tiny_G, num_samples=SPREAD_SAMPLES) is s  # cached per generator
    # Same draws as the estimator (seed 0, batches of 1000): the same numbers.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        w = torch.cat([tiny_G.mapping(torch.randn(1000, tiny_G.z_dim, generator=gen), None)[:, 0] for _ in range(2)])
    assert torch.allclose(s, w.std(dim=0), rtol=1e-4)
    # Independent draws: a sampling estimate of the same spread.
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        w = tiny_G.mapping(torch.randn(4000, tiny_G.z_dim, generator=gen), None)[:, 0]
    assert ((s - w.std(dim=0)).abs() / w.std(dim=0)).mean() < 0.05


# ---------------------------------------------------------------------------------------------------------------
# Candidates with the tiny models


@pytest.fixture(scope="module")
def tiny_candidates(tiny_G, tiny_encoder, aligned, recognizer):
    return make_candidates(tiny_G, tiny_encoder, aligned("001_neutral"), seed=7, recognizer=recognizer,
                           spread_samples=SPREAD_SAMPLES)


def test_nine_distinct_and_reported(tiny_candidates, tiny_G):
    assert len(tiny_candidates) == 9
    for k, c in enumerate(tiny_candidates):
        assert isinstance(c, Candidate) and c.index == k
        assert c.image.shape == (64, 64, 3) and c.image.dtype == np.uint8
        assert c.ws.shape == (1, tiny_G.num_ws, tiny_G.w_dim)
        # The tiny random generator makes no faces: reported as such, never a made-up distance.
        assert c.status == "no face" and c.distance is None
    imgs = [c.image for c in tiny_candidates]
    assert all(not np.array_equal(imgs[i], imgs[j]) for i in range(9) for j in range(i + 1, 9))


def test_same_seed_same_faces(tiny_candidates, tiny_G, tiny_encoder, aligned, recognizer):
    again = make_candidates(tiny_G, tiny_encoder, aligned("001_neutral"), seed=7, recognizer=recognizer,
                            spread_samples=SPREAD_SAMPLES)
    assert all(np.array_equal(a.image, b.image) and torch.equal(a.ws, b.ws) for a, b in zip(tiny_candidates, again))
    other = make_candidates(tiny_G, tiny_encoder, aligned("001_neutral"), seed=8, guard_threshold=None,
                            spread_samples=SPREAD_SAMPLES)
    assert all(not np.array_equal(a.image, b.image) for a, b in zip(tiny_candidates, other))
    assert all(c.status == "unchecked" and c.distance is None for c in other)


def test_noise_only_in_chosen_layers(tiny_G, tiny_encoder, aligned):
    target = aligned("002_neutral")
    ws0 = encode_face(tiny_encoder, target)
    for layers, rows in ((("coarse",), [0, 1, 2]), (("middle", "fine"), list(range(3, 10)))):
        cands = make_candidates(tiny_G, tiny_encoder, target, num=3, layers=layers, seed=1, guard_threshold=None,
                                spread_samples=SPREAD_SAMPLES)
        for c in cands:
            moved = (c.ws - ws0).abs().amax(dim=2)[0] > 0
            assert moved.nonzero().flatten().tolist() == rows
    # Scale is relative to the spread of W: the noise's per-dimension std is close to noise_scale * spread.
    cands = make_candidates(tiny_G, tiny_encoder, target, num=9, layers="all", noise_scale=0.5, seed=3,
                            guard_threshold=None, spread_samples=SPREAD_SAMPLES, per_layer=True)
    noise = torch.cat([(c.ws - ws0)[0] for c in cands])  # [9 * num_ws, w_dim]
    ratio = noise.std(dim=0) / estimate_w_spread(tiny_G, num_samples=SPREAD_SAMPLES)
    assert 0.4 < ratio.mean() < 0.6


def test_zero_noise_reproduces_the_encoding(tiny_G, tiny_encoder, aligned):
    target = aligned("003_neutral")
    cands = make_candidates(tiny_G, tiny_encoder, target, num=2, noise_scale=0.0, guard_threshold=None)
    ref = synthesize(tiny_G, encode_face(tiny_encoder, target))[0]
    assert all(np.array_equal(c.image, ref) for c in cands)


def test_bad_arguments(tiny_G, tiny_encoder, aligned):
    target = aligned("001_neutral")
    with pytest.raises(KeeprError, match="shape"):
        make_candidates(tiny_G, None, target, target_ws=torch.zeros(1, 5, 64), guard_threshold=None)
    with pytest.raises(KeeprError, match="encoder"):
        make_candidates(tiny_G, None, target, guard_threshold=None)
    with pytest.raises(KeeprError, match="no face found in the aligned target"):
        make_candidates(tiny_G, tiny_encoder, np.full((256, 256, 3), 128, np.uint8),
                        spread_samples=SPREAD_SAMPLES)


def test_grid(tiny_candidates):
    grid = candidate_grid(tiny_candidates, cell=128)
    assert grid.shape == (384, 384, 3) and grid.dtype == np.uint8
    import cv2
    for c in tiny_candidates:
        r, q = divmod(c.index, 3)
        tile = grid[r * 128:(r + 1) * 128, q * 128:(q + 1) * 128].astype(int)
        plain = cv2.resize(c.image, (128, 128), interpolation=cv2.INTER_CUBIC).astype(int)
        diff = np.any(tile != plain, axis=2)
        # The label is drawn in the bottom strip and nowhere else.
        assert diff[-30:].sum() > 50 and not diff[:-30].any()


# ---------------------------------------------------------------------------------------------------------------
# Identity guard with real photos standing in for candidates


def test_identity_check_real_photos(recognizer, aligned):
    from anonymizer.candidates import guard_descriptor
    target = guard_descriptor(recognizer, aligned("001_neutral"))
    d_same, s_same = identity_check(recognizer, aligned("001_smiling"), target)
    d_other, s_other = identity_check(recognizer, aligned("002_neutral"), target)
    assert s_same == "too close" and d_same < SAME_PERSON_THRESHOLD
    assert s_other == "ok" and d_other >= SAME_PERSON_THRESHOLD
    # Small crops (generator resolution) are upscaled before detection.
    d_small, s_small = identity_check(recognizer, aligned("002_neutral", 128), target)
    assert s_small == "ok" and abs(d_small - d_other) < 0.1
    assert identity_check(recognizer, np.full((64, 64, 3), 100, np.uint8), target) == (None, "no face")


class PhotoGenerator(torch.nn.Module):
    """Stand-in generator whose 'synthesis' returns real photos: in the first batch, even candidates are the target
    person (same person, other photo) and odd ones another person; every redraw returns another person."""

    def __init__(self, same, others):
        super().__init__()
        self.z_dim = self.w_dim = 8
        self.img_resolution, self.num_ws = 256, 14
        self.same, self.others = same, others
        self.calls = 0
        self.register_buffer("w_avg", torch.zeros(8))
        self.mapping = lambda z, c=None, **kw: z[:, None, :].repeat(1, self.num_ws, 1)
        self.synthesis = self._synthesis

    def _synthesis(self, ws, noise_mode="const"):
        n = ws.shape[0]
        if self.calls == 0:
            imgs = [self.same if k % 2 == 0 else self.others[k % len(self.others)] for k in range(n)]
        else:
            imgs = [self.others[self.calls % len(self.others)]] * n
        self.calls += 1
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float()
        return x / 127.5 - 1.0


@pytest.mark.parametrize("max_redraws", [0, 2])
def test_guard_redraws_same_person(recognizer, aligned, max_redraws):
    target = aligned("001_neutral")
    G = PhotoGenerator(aligned("001_smiling"), [aligned("002_neutral"), aligned("lisa1"), aligned("004_smiling")])
    cands = make_candidates(G, None, target, num=4, target_ws=torch.zeros(1, 14, 8), recognizer=recognizer,
                            max_redraws=max_redraws, spread_samples=100)
    for c in cands:
        assert c.distance is not None
        if c.index % 2 == 1:  # another person on the first draw: accepted at once
            assert c.status == "ok" and c.draws == 1 and c.distance >= SAME_PERSON_THRESHOLD
        elif max_redraws == 0:  # same person and no redraws allowed: reported as rejected with its distance
            assert c.status == "rejected" and c.draws == 1 and c.distance < SAME_PERSON_THRESHOLD
        else:  # same person: redrawn, the redraw (another person) accepted
            assert c.status == "ok" and c.draws == 2 and c.distance >= SAME_PERSON_THRESHOLD
            assert len(c.history) == 1 and c.history[0] < SAME_PERSON_THRESHOLD
    grid = candidate_grid(cands, cell=96, cols=2)
    assert grid.shape == (192, 192, 3)
