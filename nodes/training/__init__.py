"""Training: float64 moment accumulators, Phase-1 and Phase-2 trainers, their configs and state.

Also the pieces both phases lean on: thresholds, drift statistics, initialization quality checks,
sharded Phase-1 fits and the guide's ``Results`` view of a run.
"""
