"""``python -m ctlib.synthetic``: write a synthetic CT-RATE snapshot (see :func:`ctlib.synthetic.generate`)."""

from ctlib.synthetic.writer import main

raise SystemExit(main())
