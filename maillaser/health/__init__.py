"""
``/health``, ``/metrics`` and ``/attachments``: twisted.web resources that
read the state of the other parts and never drive them, and the Prometheus
metrics of the SMTP front (L{FrontMetrics}) and of the delivery worker
(L{DeliveryMetrics}).
"""

from maillaser.health._attachments import (
    MAX_FETCHES,
    AttachmentResource,
    disposition,
)
from maillaser.health._metrics import (
    BREAKER_STATES,
    LATENCY_BUCKETS,
    OUTCOMES,
    DeliveryMetrics,
    FrontMetrics,
)
from maillaser.health._resources import (
    METRICS_TIMEOUT,
    Health,
    HealthResource,
    MetricsResource,
    QuietSite,
    make_site,
)

__all__ = [
    "BREAKER_STATES",
    "LATENCY_BUCKETS",
    "MAX_FETCHES",
    "METRICS_TIMEOUT",
    "OUTCOMES",
    "AttachmentResource",
    "DeliveryMetrics",
    "FrontMetrics",
    "Health",
    "HealthResource",
    "MetricsResource",
    "QuietSite",
    "disposition",
    "make_site",
]
