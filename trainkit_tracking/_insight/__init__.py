"""What the SDK adds to runs beyond what the user logs: cross-validation summaries and the
sweep's leaderboard (``cv``, ``cv_stats``, ``plots``), run context tags (``context``) and
system metrics (``system``).

May import ``_journal``, ``_store``, ``_process``, ``_core`` and ``errors``; runs are
reached through small protocols, never through ``_runs``.
"""
