"""The benchmarks: ``bench_*.py`` are the scripts (``python benchmarks/bench_quality.py``, or
``make bench-*``); each puts the project root on ``sys.path`` and imports its helpers from here
as ``benchmarks.<module>`` (``quality_*`` for bench_quality, ``preprocess_*`` for bench_preprocess)."""
