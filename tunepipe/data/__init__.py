"""The data stage: sources (files, globs, folders, saved datasets, hub ids, records in memory) read record by
record with their origins (readers, sources), checked as they are read (checks), stored as memory-mapped Arrow
tables (records), cached with their tokenized form between runs (cache), or streamed (stream)."""
from .checks import MAX_REPORTED
from .modules import SPLITS, DatasetModules
from .predict_inputs import (PREDICT_INPUT_FORMATS, PredictInputs, looks_like_path, read_predict_inputs,
                             read_predict_records)
from .readers import EXTENSIONS, iter_file
from .records import ArrowRecords, Records, with_all_keys

__all__ = ["ArrowRecords", "DatasetModules", "EXTENSIONS", "MAX_REPORTED", "PREDICT_INPUT_FORMATS", "PredictInputs",
           "Records", "SPLITS", "iter_file", "looks_like_path", "read_predict_inputs", "read_predict_records",
           "with_all_keys"]
