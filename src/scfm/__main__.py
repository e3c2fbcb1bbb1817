"""``python -m scfm``: the same command line as ``scfm``."""

from scfm.cli import main

raise SystemExit(main())
