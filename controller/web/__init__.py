"""The incident lead's page, the incident report and Grafana annotations (see README)."""
