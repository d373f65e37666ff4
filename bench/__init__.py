"""keymgmt benchmarks (issue #7): ratios against baselines measured in the same run.

Run ``make bench`` (or ``python -m bench``); ``make bench-smoke`` runs every
benchmark with tiny sizes. See bench/README.md.
"""
