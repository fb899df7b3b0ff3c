"""What one OS process shares: its exit, signal and fork hooks (``hooks``, the only place
that installs any), file locks the kernel releases on death (``file_lock``), calls bounded
in time (``bounded``) and its distributed rank (``rank``).

May import ``_core`` and ``errors``.
"""
