"""Training: one loop skeleton (loop.py) with a small task per stage (vae.py, dalle.py, clip.py),
schedules, mixed precision, distributed training and the main job (pipeline.py)."""
