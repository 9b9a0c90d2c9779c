"""Stage 4: calibration data → activation statistics → calibration cache (INT4 AWQ, FP8)."""
