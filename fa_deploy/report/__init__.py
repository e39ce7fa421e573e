"""Reports: what people and programs read.

    tables.py    console and Markdown tables, atomic JSON
    plots.py     the trade-off, PGD-steps, deployment-drop and sanity plots (matplotlib PNGs)
    pictures.py  detections under attack with Grad-CAM of the aligned layer (the paper's Figure 3)
    html.py      fa-bench --report: one self-contained HTML page

The bottom floor: nothing here imports another fa_deploy package (fa_deploy.runtime.predict draws with pictures.py).
"""
