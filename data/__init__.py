"""Data layer: native MXNet RecordIO (``recordio``), InsightFace/plain dataset layouts
(``layout``), verification ``.bin`` pair sets (``verification``), the ``rec2img`` /
``img2rec`` tools, and the Lightning DataModule with its transforms and demo data."""
