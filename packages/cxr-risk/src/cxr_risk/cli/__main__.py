"""``python -m cxr_risk.cli``, the same as the ``cxr-risk`` console script (e.g. under ``torchrun``)."""

from . import main

raise SystemExit(main())
