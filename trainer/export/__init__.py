"""ONNX export: a training checkpoint in, a complete model version folder out.

The version folder is the one contract between training and serving (serving.contract: its
layout, tensor names, the typed Manifest and the metadata_props of every file):

    <repository>/<name>/config.pbtxt         Triton-compatible config (rewritten atomically)
    <repository>/<name>/<version>/model.onnx uint8 NCHW `images` -> `logits`, `probabilities`
    <repository>/<name>/<version>/manifest.json
    <repository>/<name>/<version>/model.opt.onnx | model.int8.onnx | model.fp16.onnx (optional)
    <repository>/<name>/<version>/model.insight.onnx  the same network with every conv stage's
                                             activation maps as extra outputs (for Explain
                                             and reports; model.onnx stays one clean pass)

The steps, one module each:
    model.py     the checkpoint found, read and rebuilt as an eval-mode network
    graph.py     the network wrapped, exported (dynamo, else TorchScript), stamped, checked
    parity.py    ONNX Runtime against PyTorch on the test set (topped up to 2,000 images)
    variants.py  optional optimised / INT8 (int8.py) / FP16 graphs, measured or rejected
    manifest.py  the manifest a version starts from: recipe, dataset, provenance
    publish.py   the hidden build folder renamed into place; the Triton config
    build.py     export_checkpoint: those steps in order

The manifest's reports are the exporter's to describe. parity: samples, test_samples,
max_abs_diff_probability, max_abs_diff_logit, argmax_agreement, torch_test_accuracy,
ort_test_accuracy, tolerance_probability, execution_provider. variants and
rejected_variants: see trainer.export.variants. insight: {file, stages: [{name, layer, kind,
shape [C, H, W], receptive_field, jump, start}]}, the analytic plan of each extra output of
model.insight.onnx.
"""

from trainer.export.build import ExportResult, export_checkpoint
from trainer.export.errors import ExportError
from trainer.export.model import load_model, resolve_checkpoint

__all__ = ["ExportError", "ExportResult", "export_checkpoint", "load_model", "resolve_checkpoint"]
