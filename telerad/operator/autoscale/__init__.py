"""Autoscaling of AIModel workers on queue depth and GPU utilisation."""
