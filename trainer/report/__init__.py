"""Reports: one self-contained HTML page that shows what a CNN learned.

    page.py        the page: Section, table_html, write_report (no torch, no onnxruntime)
    figures.py     each figure: plain data in, a matplotlib Figure out
    evaluation.py  the parts both reports share: occlusion, confusion, per-class, mistakes
    run.py         everything a training run shows (`cnn-report RUN_DIR`; needs torch)
    audit.py       an exported model on labelled data, ONNX Runtime alone
                   (`cnn-report --model models/NAME/VERSION --data PATH`; no torch)

The `cnn-report` command is trainer.cli.report_main. Importing this package imports nothing.
"""


class ReportError(Exception):
    """A report that cannot be built; the message says why in one line."""
