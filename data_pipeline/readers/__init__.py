"""Readers for the supported dataset layouts, with validation that names every bad row.

Each layout (one module per format, named in ``registry.py``) turns its files into a list of *candidate rows*
(line, id, label text, image path, source file); one shared validator (``candidates.validate``) then checks every
candidate (id present and unique, label an integer in 0..K-1, image file present) and collects ALL problems before
refusing the data set -- a user fixing a 35k-row CSV wants the full list, not the first. Rows a layout marks as
ungradable (DDR label 5, Messidor-2 ``adjudicated_gradable`` 0) are dropped with a logged count: they are part of
the data set's definition, not mistakes.

The CSV helpers (`read_csv_table`, `parse_int`, `format_bad_rows`) are public because `splits` reuses them.
"""
from data_pipeline.readers.candidates import IMAGE_EXTS
from data_pipeline.readers.factory import detect_format, read_dataset, read_dataset_report
from data_pipeline.readers.registry import FORMATS, RAW_FORMATS, READERS
from data_pipeline.readers.table import MAX_LISTED_ROWS, BadRow, CsvTable, format_bad_rows, parse_int, read_csv_table

__all__ = ["BadRow", "CsvTable", "FORMATS", "IMAGE_EXTS", "MAX_LISTED_ROWS", "RAW_FORMATS", "READERS",
           "detect_format", "format_bad_rows", "parse_int", "read_csv_table", "read_dataset", "read_dataset_report"]
