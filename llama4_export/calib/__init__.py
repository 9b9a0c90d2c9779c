"""Stage 5: calibration — text → token samples → activation statistics (layer by layer from a weight source) → the
calibration cache (INT4 AWQ plans, FP8 activation and KV-cache scales).

corpus.py     calibration / evaluation text (files or the embedded standard-library docstring corpus), token samples
layerwise.py  the source's fp32 model run one decoder layer at a time (routed experts one at a time), sites accumulated
stats.py      per-site statistics (amax, mean |x|, |x| histogram, Gram matrices) and the cache file
awq.py        AWQ scale + clipping search on one layer's statistics → a plan of elementwise ops
awq_plans.py  plans for every layer on disk, replayed on the weights as the export reads them (AwqWeights)
calibrate.py  the above through the cache; FP8 activation amax per linear weight
The quantization itself is a graph pass: graph_passes/quantize.py (its docstring states the ONNX conventions).
"""
