"""Ray Serve deployments: one file per model, plus the HTTP ingress. Model logic lives in
``festival_serve`` (no Ray there); these classes only load, batch and report."""
