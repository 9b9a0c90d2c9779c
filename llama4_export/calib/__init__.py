"""Stage 4: calibration data → activation statistics → calibration cache (INT4 AWQ, FP8), and the accuracy report.

corpus.py     calibration / evaluation text (files or the embedded standard-library docstring corpus), token samples
stats.py      per-site activation statistics (amax, mean |x|, Gram matrix) by hooks on the PyTorch model; cache file
calibrate.py  the two together, through the cache; FP8 activation amax per linear weight
awq.py        AWQ scale + clipping search on the statistics, folded into the fp32 model before export
report.py     quantized artifact (ONNX Runtime) vs the fp32 PyTorch model on held-out text → report.json
The quantization itself is a graph pass: graph_passes/quantize.py (its docstring states the ONNX conventions).
"""
