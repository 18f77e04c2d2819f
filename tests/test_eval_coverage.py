"""eval's "faces left" metric: faces the method left as they were, anyone's, with the frames."""
from __future__ import annotations

import numpy as np

from anonymizer.fallback import blur_region
from eval.coverage import MIN_CHANGE, faces_left, inner_change


def test_faces_left_counts_untouched_faces_with_frames():
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (120, 240, 3), dtype=np.uint8) for _ in range(5)]
    a, b = (20.0, 20.0, 80.0, 80.0), (140.0, 20.0, 200.0, 80.0)
    faces = [[a, b] for _ in range(5)]
    # The method blurs face a everywhere and face b only in frames 0-1; codec-like noise everywhere else.
    out = []
    for i, f in enumerate(frames):
        g = blur_region(f, a)
        if i < 2:
            g = blur_region(g, b)
        noise = rng.integers(-2, 3, g.shape)
        out.append(np.clip(g.astype(int) + noise, 0, 255).astype(np.uint8))
    r = faces_left(frames, out, faces)
    assert r == {"faces_seen": 10, "faces_left": 3, "faces_left_frames": "2-4"}
    assert inner_change(frames[0], out[0], a) > 5 * MIN_CHANGE
    assert faces_left(frames, frames, faces)["faces_left"] == 10  # `none` leaves every face
