"""Stage 5, report: what a researcher reads: scores with intervals, the HTML report, Grad-CAMs.

``evaluate.py`` (any predictions file against a dataset), ``html.py`` (``write_report``: the
page), ``context.py`` (what its sections read), ``plots.py`` (its figures), ``cam.py`` (Grad-CAM).

May import: every earlier stage (core, data, train, search, ensemble); never cli.
"""
