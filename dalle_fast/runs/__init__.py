"""Run folders: checkpoints (safetensors weights, resumable state, config.json), the run log, the
pictures a run writes, and loading trained runs."""
