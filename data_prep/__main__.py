"""``python -m fedseg.data_prep fets2022|synth``: an alias of ``fedseg prepare|synth`` (see fedseg.data_prep.cli)."""

from fedseg.data_prep.cli import main

raise SystemExit(main())
