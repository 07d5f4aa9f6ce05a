"""Tuning and measuring the predictor: per-layer alpha calibration, evaluation, their plots."""
