"""Tests of the training pipeline package (kubeloop_pipelines)."""
