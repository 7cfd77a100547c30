"""The ``sign_detector`` stage: a YOLO sign detector, then a classifier that names each box from its crop."""
