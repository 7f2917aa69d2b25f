"""``python -m graphquant``: the command line (see ``graphquant.cli``)."""

from graphquant.cli import main

raise SystemExit(main())
