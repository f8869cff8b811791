"""Local Kubernetes control-plane fixtures (placeholder, filled in by issue 4)."""
