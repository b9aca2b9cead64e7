"""The telerad API: custom resources, runtime configuration, conditions, names.

Pure models and builders, no I/O: the operator and the runtime both import it, and it
imports neither.
"""
