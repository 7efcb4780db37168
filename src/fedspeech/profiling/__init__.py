"""Resource profiler and feasibility planner for wav2vec 2.0 pretraining on edge devices.

``fedspeech profile`` measures a pretraining step (FLOPs, activation and peak memory, time)
per module and per layer; ``fedspeech feasibility`` applies a documented device model to a
device catalogue. See docs/profiling.md.
"""
