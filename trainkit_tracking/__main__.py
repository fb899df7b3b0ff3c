"""``python -m trainkit_tracking``: the same command line as the ``trainkit-tracking`` script."""

from __future__ import annotations

from trainkit_tracking.cli import main

if __name__ == "__main__":
    main()
