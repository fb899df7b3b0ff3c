"""Push: copy runs of one store into another, exactly once. ``push`` selects and orders the
runs, ``run_copy`` sends one run (what the target lacks), ``target_index`` finds pushed runs
by origin, ``marks`` and ``report`` say what was done, ``store_calls`` and
``background_calls`` are the store calls push needs beyond ``Store``.

May import ``_journal``, ``_store``, ``_process``, ``_core`` and ``errors`` (not ``_runs``).
"""
