"""``python -m jacplug`` (also what ``torchrun ... -m jacplug train`` runs)."""

from jacplug.cli.main import main

raise SystemExit(main())
