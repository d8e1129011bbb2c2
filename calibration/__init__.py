"""Calibration: representative inputs at every graph boundary, the FP16 safety analysis that writes the
engines' precision policy, and INT8 forms (explicit quantization) with their gate.

- calibration/corpus.py      the calibration set (texts EN/ZH, generated voices; user-extendable)
- calibration/collect.py     run the pipeline, keep the feeds (calibration/feeds.py: storage + statistics)
- calibration/fp16_emulation.py   FP16 as TensorRT computes it, emulated on the ONNX graph in ONNX Runtime
- calibration/fp16_analysis.py    per layer: max |activation|, error added, first NaN/Inf -> fp32 flags
- calibration/policy_writer.py    base policy + measured rules -> precision_policy.json (engines/precision.py)
- calibration/effect.py      end to end: greedy-token agreement, mel / waveform SNR against float32
- calibration/int8_qdq.py    INT8 forms: Q/DQ from the feeds (ONNX Runtime's quantizer) on the fp16 form, checked
- calibration/gate.py        the INT8 gate on the CPU: forms below the limits are refused
- calibration/int8_build.py  INT8 for an export: forms, gate, manifest (refused graphs keep fp16), plans
- calibration/report.py      the Markdown report
CLI: python -m calibration collect | analyze | effect | report | int8 | int8-gate
"""
