"""Hydra launcher plugin `hydra/launcher=fused` (fused_launcher.py): a sweep's runs trained side by side."""
