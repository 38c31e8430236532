"""dom0's policy: parsing and evaluation (pure), loaders, and the policy programs."""
