"""Spike: a steady BASE_USERS, a burst to SPIKE_USERS for SPIKE_SECONDS, then back, then stop.

    locust -f locust/locustfile.py,locust/shapes/spike.py --headless ExtAuthzHeaderUser ...
The interesting numbers are the failures during the burst and how fast p95 recovers after it.
"""

import os

from locust import LoadTestShape


class Spike(LoadTestShape):
    base = int(os.environ.get("BASE_USERS", "100"))
    spike = int(os.environ.get("SPIKE_USERS", "1000"))
    calm = int(os.environ.get("CALM_SECONDS", "20"))
    burst = int(os.environ.get("SPIKE_SECONDS", "10"))

    def tick(self):
        t = self.get_run_time()
        if t < self.calm:
            return self.base, self.base
        if t < self.calm + self.burst:
            return self.spike, self.spike  # spawn the burst within a second
        if t < 2 * self.calm + self.burst:
            return self.base, self.spike
        return None
