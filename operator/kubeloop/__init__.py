"""kubeloop: a Kubernetes operator that closes the machine-learning loop."""

GROUP = "kubeloop.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
__version__ = "0.1.0"
