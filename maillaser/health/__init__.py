"""
``/health`` and ``/metrics``: twisted.web resources that read the state of
the other parts and never drive them.
"""
