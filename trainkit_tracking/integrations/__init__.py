"""Opt-in integrations with torch (DDP), Hugging Face transformers and Optuna.

Each submodule imports its framework at the top; import the one you need, e.g.
``from trainkit_tracking.integrations.transformers import TrackingCallback``.
"""
