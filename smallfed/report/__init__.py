"""Results files, tables and plots."""

from smallfed.report.results import SCHEMA_VERSION, RunRecorder
from smallfed.report.table import print_rounds, rounds_table

__all__ = ["SCHEMA_VERSION", "RunRecorder", "print_rounds", "rounds_table"]
