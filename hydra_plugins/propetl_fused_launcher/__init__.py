"""Hydra launcher plugin `hydra/launcher=fused` (fused_launcher.py): a sweep's seeds trained side by side."""
