"""Training losses (pSp/e4e layout): perceptual LPIPS with user-supplied backbone weights."""
