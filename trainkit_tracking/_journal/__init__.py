"""The journal: everything a process logs, from the call to the store. ``run_logger``
validates at the call site; the ``worker`` spools it (``channel``, ``spool``, ``records``);
the ``sender`` (a process of its own, started by ``sender_launch``, held by
``sender_lock``) sends it; ``sync`` sends what dead processes left; ``heartbeat`` beats.

May import ``_store``, ``_process``, ``_core`` and ``errors``.
"""
