"""Runs: the ``Tracker`` facade (``tracker``), where runs go (``resolve``), how they are made
(``create``), the ``Run`` itself (``run``), subprocess handover (``handover``), runs shared
by many processes (``shared``), lineage, and how open runs end at exit (``exit``).

May import ``_insight``, ``_journal``, ``_store``, ``_process``, ``_core`` and ``errors``.
"""
