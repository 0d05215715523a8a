"""Probes: behavioural tests of a trained model (`bias`: the counterfactual bias probe). The verb that runs
them is `lmtune probe` (lmtune/probe.py); `lmtune evaluate --probe bias` runs the built-in templates."""
