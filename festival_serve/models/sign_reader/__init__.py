"""The ``sign_reader`` stage: PP-OCR text detection + the Vietnamese recognizer on sign crops."""
