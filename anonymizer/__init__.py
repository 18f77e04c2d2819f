"""KEEP:R anonymization pipeline, one module per stage; each is usable and testable on its own.

Stages (``infer.py`` only wires them together):

- ``faces``      -- image loading, dlib face detection (HOG or MMOD CNN), 68 landmarks, FFHQ-style alignment,
                    inverse transform and pasting an aligned crop back into its frame.
- ``identity``   -- dlib ResNet 128-d face descriptor and distance, used by the identity guard.
- ``candidates`` -- encode the aligned target, add noise to its latent in chosen style layers and synthesise
                    9 virtual-face candidates, with the identity guard and a labelled 3x3 grid.
- ``skin``       -- skin mask from landmarks, dominant skin tone by K-means in HSV, moving the candidate's hue and
                    saturation to the target's.
- ``video``, ``tracking``, ``blend``, ``pipeline`` -- reading/writing video, following the target face over
                    frames, blending the swapped face back, and the frame loop.
"""
