"""The commands of ``trainkit-tracking`` (``cli.py`` is the entry point): ``doctor``,
``naming`` (``name``), ``policy``, ``tree``, ``ops`` (``sync``, ``reap``), ``push``, and what
they share (``common``).

May import every room below it; nothing imports it but ``cli.py``.
"""
