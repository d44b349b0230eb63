"""The federation kit: certificates, the local launcher and the Prometheus exporters.

Run its modules from the repository root: ``python -m deploy.certs``, ``python -m deploy.launch``,
``python -m deploy.exporter`` (see ``deploy/README.md``).
"""
