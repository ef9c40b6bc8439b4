"""Backends own every byte of I/O: the Kubernetes API, executors, serving, metrics."""
