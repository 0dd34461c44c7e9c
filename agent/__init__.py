"""prestop-agent: a sidecar that lets a Spring Cloud / Eureka pod stop without failing requests."""

__version__ = "0.3.0"
