"""Training Mamba-1 models: TOML configs and presets (config), data incl. the paper's synthetic tasks (data),
the loop with checkpoints/resume/DDP (trainer), task metrics through forward and step (evaluate), curves (plots).

Nothing heavy is imported here; ``from mamba_deploy.training.trainer import train`` pulls in the loop."""
