"""Workflows over the layers below: `load` (a checkpoint or HF folder into a model, calibrating a
never-calibrated one in memory) and the converter's calibration step."""
