"""KEEP:R anonymization pipeline, one module per stage; each is usable and testable on its own.

Stages (``infer.py`` only wires them together):

- ``faces``      -- image loading, dlib face detection (HOG or MMOD CNN), 68 landmarks, FFHQ-style alignment,
                    inverse transform and pasting an aligned crop back into its frame.
- ``identity``   -- dlib ResNet 128-d face descriptor and distance, used by the identity guard.
- ``candidates`` -- encode the aligned target, add noise to its latent in chosen style layers and synthesise
                    9 virtual-face candidates, with the identity guard and a labelled 3x3 grid.
- ``skin``       -- skin mask from landmarks, dominant skin tone by K-means in HSV, moving the candidate's hue and
                    saturation to the target's.
- ``video``        -- streaming decode (PyAV) and H.264 encode with the audio stream copied unchanged.
- ``tracking``     -- following the target face over frames, smoothing its box, handling frames where it is lost.
- ``crop``         -- the square co-part framing, the same rule for the virtual face and for every frame.
- ``virtual_face`` -- from the target's best frame to the chosen, skin-matched virtual face.
- ``blend``        -- pasting the swapped crop back into the full frame with a feathered mask.
- ``pipeline``     -- wires the stages: decode -> track -> virtual face -> crop -> part swap -> paste -> encode.
"""
