"""Step ramp to find the knee: +STEP_USERS every STEP_SECONDS up to MAX_USERS, then stop.

    locust -f locust/locustfile.py,locust/shapes/step.py --headless ExtAuthzHeaderUser ...
Watch where p95 starts climbing while requests/s flattens: that step is the knee.
"""

import os

from locust import LoadTestShape


class StepRamp(LoadTestShape):
    step_users = int(os.environ.get("STEP_USERS", "100"))
    step_seconds = int(os.environ.get("STEP_SECONDS", "15"))
    max_users = int(os.environ.get("MAX_USERS", "1000"))

    def tick(self):
        elapsed = self.get_run_time()
        steps = int(elapsed // self.step_seconds) + 1
        users = steps * self.step_users
        if users > self.max_users + self.step_users:
            return None
        return min(users, self.max_users), self.step_users
