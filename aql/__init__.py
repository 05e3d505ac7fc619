"""aql: adaptive query-based learning on top of aql_kernels."""

__version__ = "0.1.0"
