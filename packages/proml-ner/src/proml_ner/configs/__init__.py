"""Bundled experiment configs, one YAML file per setting of the ProML paper (see :mod:`proml_ner.experiment`).

List them with ``proml-ner configs``; run one with ``proml-ner train NAME --set data.root=/path/to/data``.
"""
