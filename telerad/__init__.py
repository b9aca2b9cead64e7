"""telerad: a Kubernetes operator and runtime for AI-driven teleradiology."""

__version__ = "0.1.0"
