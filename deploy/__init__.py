"""Deployment: export, site configuration, services."""
